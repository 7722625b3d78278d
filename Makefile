# One-command set-up for a fresh machine with Python 3.11 and pip.
# torch==2.13.0 is installed before the package so that pip takes the local CPU
# wheel instead of resolving `torch>=2.4` to several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sparse-topk-installed

.PHONY: setup demo test lint docs bench gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[jax,torch,test,docs,dev,examples]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m topk_core

# Two workers (the CI machine's two cores): about 10 minutes, with a warm Numba cache or on a fresh clone (585 s and 624 s of tests here).
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal
	$(BIN)/mkdocs build --strict --site-dir $(VENV)/site

docs: setup
	$(BIN)/mkdocs build --strict --site-dir $(VENV)/site

# The peers of the suite (ott-jax, difftopk) come with the bench extra; prints the tables.
bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_methods.py
	$(BIN)/python benchmarks/run.py

# Pure-Python wheels that a GPU machine's image may lack, for benchmarks/gpu_check.sh (into .whl/).
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d .whl array-api-compat array-api-strict entmax

clean:
	rm -rf $(VENV) site .pytest_cache
