#!/usr/bin/env bash
# The GPU part of issue 5 in one prepared run: the tests that need a GPU, the JAX tests on the
# GPU (JAX's default device there), then the benchmark suite on CUDA (PyTorch and JAX) at the
# issue's shapes. For a machine with a CUDA GPU whose Python already has CUDA builds of PyTorch
# and JAX, NumPy, Numba and pytest (nothing is installed over them). From the repository's root:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# OUTDIR receives log.txt (everything printed, measurements included as they come, so a run cut
# short still leaves them), benchmarks.md (a copy of docs/benchmarks.md whose section
# bench_suite_cuda holds the new tables) and its figures in OUTDIR/figures: copy the section and
# the figures into docs/ to publish them. Pure-Python packages the machine may lack
# (array-api-compat, array-api-strict, entmax) are installed from the wheels in .whl/ when that
# folder has any, into a temporary folder (`make gpu-wheels` downloads them; docs/benchmarks.md).
# STEPS (default "tests bench"; "tests" is "gpu-tests jax-tests"; "jax-target" times JAX's threshold
# method alone at (2^20, 64) (STEP_JAX_TARGET=180 s); "fused" adds
# benchmarks/bench_fused_threshold.py at FUSED_SHAPES, PAV timed below PAV_BELOW entries, more
# options in FUSED_ARGS, e.g. "--unroll 1,4 --breakdown",
# STEP_FUSED=240 s) picks the steps, so that they can run as two calls; each has a
# time limit in seconds, STEP_GPU_TESTS (default 300), STEP_TESTS (default 180, JAX tests on
# WORKERS=8 processes) and STEP_BENCH (default 300): STEPS=tests and STEPS=bench each fit in a
# 10-minute call (in the first run, on an H200, Numba's first compilation took 100 s of the GPU
# tests). DEVICE=cpu QUICK=1 runs the same steps as a smoke run on a machine without a GPU
# (about 5 minutes on 2 cores, where the JAX step reaches its limit).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out/figures"
exec > >(tee "$out/log.txt") 2>&1
started=$SECONDS

if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH=$site
fi
# The packages from the working tree, uninstalled (import names: topk_core and the adapters).
export PYTHONPATH="$PWD:$PWD/adapters${PYTHONPATH:+:$PYTHONPATH}"
# PyTorch and JAX share the GPU in one process: JAX takes memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
"$py" - <<'EOF' || exit 1
import jax, numba, numpy, torch
import topk_core, topk_jax, topk_torch  # noqa: F401  (the working tree imports)
print("python", __import__("sys").version.split()[0], "| numpy", numpy.__version__, "| numba", numba.__version__)
print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("jax", jax.__version__, jax.devices())
EOF

status=0
steps=${STEPS:-tests bench}
# pytest-benchmark (in the H200 image) warns under xdist at start-up, which filterwarnings=error
# turned into an internal error of the whole JAX step in the first run: keep it out.
pytest_opts=(-p no:cacheprovider -p no:benchmark)
if [[ $steps == *tests* && $steps != *jax-tests* || $steps == *gpu-tests* ]] && [ "$device" = cuda ]; then
    echo "== tests that need a GPU ($((SECONDS - started)) s)"
    log=$(mktemp)
    # The first call of a PAV test compiles the Numba kernels (about 100 s on the H200 machine).
    timeout "${STEP_GPU_TESTS:-300}" "$py" -m pytest -q "${pytest_opts[@]}" -rs --durations=5 -m gpu tests 2>&1 \
        | tee "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # Every one of them must have run: a skip here means the GPU was not seen.
    if grep -q " skipped" "$log"; then echo "GPU tests were skipped"; status=1; fi
    # The compiled solvers' own tests (on the CPU, with this machine's torch: its Dynamo).
    timeout 120 "$py" -m pytest -q "${pytest_opts[@]}" tests/test_torch_fused.py || status=1
    # The threshold method's Triton kernels, compiled, every test on the GPU (without one they
    # run in Triton's interpreter).
    timeout "${STEP_TRITON_TESTS:-240}" "$py" -m pytest -q "${pytest_opts[@]}" tests/test_triton_rows.py || status=1
fi
if [[ $steps == *tests* && $steps != *gpu-tests* || $steps == *jax-tests* ]]; then
    echo "== the JAX tests on JAX's default device ($((SECONDS - started)) s)"
    timeout "${STEP_TESTS:-180}" "$py" -m pytest -q "${pytest_opts[@]}" -n "${WORKERS:-8}" -x \
        tests/test_jax_methods.py tests/test_jax_adapter.py || status=1
fi

if [[ $steps == *fused* ]]; then
    # Not in the default steps: the adapter's compiled solver against its eager one and PAV.
    echo "== fused threshold experiment on $device ($((SECONDS - started)) s)"
    PYTHONUNBUFFERED=1 timeout "${STEP_FUSED:-240}" "$py" benchmarks/bench_fused_threshold.py --device "$device" \
        --shapes "${FUSED_SHAPES:-1048576x64,65536x64,4096x64,256x64,1x1000000,4096x4096}" \
        --pav-below "${PAV_BELOW:-10000000}" ${FUSED_ARGS:-} || status=1
fi
if [[ $steps == *jax-target* ]]; then
    # Not in the default steps: JAX's threshold method alone at the target shape (2^20, 64) and the
    # batch sweep, next to lax.top_k (no PAV: its first call compiles Numba for minutes).
    echo "== JAX threshold method at the target shape on $device ($((SECONDS - started)) s)"
    PYTHONUNBUFFERED=1 timeout "${STEP_JAX_TARGET:-180}" "$py" benchmarks/run.py --device "$device" --framework jax \
        --methods threshold --shapes 1048576x64 --max-n 0 --no-memory --time-cap 1 || status=1
fi
if [[ $steps == *bench* ]]; then
    echo "== benchmark suite on $device ($((SECONDS - started)) s)"
    cp docs/benchmarks.md "$out/benchmarks.md"
    # The issue's target shape comes first (benchmarks/run.py: GPU_SHAPES), so a run cut short has it.
    # JAX first on the GPU: the first run (PyTorch first) reached its limit before JAX's figures.
    bench=(--device "$device" --framework "$([ "$device" = cuda ] && echo jax,torch || echo torch)"
           --write "$out/benchmarks.md" --figures "$out/figures" --time-cap 1 --memory-timeout 60)
    [ -n "${QUICK:-}" ] && bench+=(--quick --no-memory)
    PYTHONUNBUFFERED=1 timeout "${STEP_BENCH:-300}" "$py" benchmarks/run.py "${bench[@]}" || status=1
fi

echo "== done in $((SECONDS - started)) s, status $status"
exit $status
