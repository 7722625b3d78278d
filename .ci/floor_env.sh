# Sourced by the *_floor.sh scripts: a virtual environment made once per set of releases, and pytest run
# from outside the checkout with its configuration.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# floor_venv DIR NAME PACKAGE...: the python of DIR/venv-NAME, made with PACKAGEs installed the first time,
# by the interpreter ${FLOOR_PYTHON:-python3}.
floor_venv() {
    local venv="$1/venv-$2"
    shift 2
    if [ ! -x "$venv/bin/python" ]; then
        mkdir -p "$(dirname "$venv")"
        "${FLOOR_PYTHON:-python3}" -m venv "$venv"
        "$venv/bin/pip" install --quiet "$@" >&2
    fi
    echo "$venv/bin/python"
}

# floor_pytest PYTHON DIR PYTEST_ARGUMENT...: that python's pytest, run from DIR on the checkout's tests.
floor_pytest() {
    local python="$1" dir="$2"
    shift 2
    cd "$dir"
    "$python" -m pytest -q -p no:cacheprovider -c "$root/pyproject.toml" --rootdir "$root" "$@"
}

# floor_core_tests PYTHON DIR PYTEST_ARGUMENT...: the checkout installed into that python's environment (editable,
# no dependencies), and the tests of the core, NumPy and PyTorch run there (JAX's helper module left out).
floor_core_tests() {
    local python="$1" dir="$2"
    shift 2
    "$python" -m pip install --quiet --no-deps -e "$root"
    floor_pytest "$python" "$dir" -n 2 \
        "$root/tests" "$root/topk_core" "$root/adapters/topk_numpy" "$root/adapters/topk_torch" \
        --ignore="$root/tests/_jax_helpers.py" "$@"
}
