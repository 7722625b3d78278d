"""Packaging contracts: import isolation, layout, and the README demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True, cwd=cwd
    )
    return done.stdout


def test_core_and_numpy_adapter_do_not_import_frameworks():
    out = _run("import sys, topk_core, topk_numpy; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    assert out.strip() == "[]"


def test_adapters_folder_is_not_an_importable_package(tmp_path):
    # Run outside the checkout: the editable install itself must not expose `adapters`.
    assert not (ROOT / "adapters" / "__init__.py").exists()
    out = _run("import importlib.util; print(importlib.util.find_spec('adapters'))", cwd=tmp_path)
    assert out.strip() == "None"
    assert not list((ROOT / "adapters").glob("*.py")), "modules must live in adapters/topk_*/"


def test_public_api_is_the_same_names():
    import topk_core
    import topk_numpy

    operators = {"soft_topk_mask", "soft_topk_mag", "hard_topk_mask", "hard_topk_mag"}
    assert operators <= set(topk_core.__all__) and operators <= set(topk_numpy.__all__)
    assert topk_core.__all__ == sorted(topk_core.__all__)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_demo_runs():
    done = subprocess.run([sys.executable, "-m", "topk_core"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hard limit" in done.stdout and "ok" in done.stdout
