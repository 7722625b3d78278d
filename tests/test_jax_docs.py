"""The Python code blocks of docs/jax.md run as written, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("jax")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "jax.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def test_page_has_examples():
    blocks = BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 6
    text = "\n".join(blocks)
    for needed in ("jax.jit", "jax.vmap", "jax.grad", "sgd_step"):
        assert needed in text


def test_python_blocks_run(capsys):
    namespace: dict[str, object] = {"__name__": "docs_jax"}
    for number, code in enumerate(BLOCK.findall(PAGE.read_text()), start=1):
        exec(compile(code, f"{PAGE.name}, python block {number}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "bfloat16" in out
    assert "float64" in out
