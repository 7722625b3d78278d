"""Every Python block of docs/torch.md runs, and prints what its comments say.

A line ``print(expr)   # expected`` must print ``expected`` (whitespace-
normalized; text after ``--`` in the comment is a remark). Each block runs on
its own, in a fresh namespace.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ._torch_helpers import quiet_lazy_torch_imports

quiet_lazy_torch_imports()

PAGE = Path(__file__).resolve().parents[1] / "docs" / "torch.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks():
    for i, block in enumerate(BLOCK.findall(PAGE.read_text())):
        first = next(line for line in block.splitlines() if line and not line.startswith(("import", "from")))
        yield pytest.param(block, id=f"block{i}-{re.sub(r'[^A-Za-z0-9]+', '_', first)[:30]}")


def _normalize(text: str) -> str:
    return " ".join(text.split())


def test_page_covers_autograd_compile_and_func():
    text = PAGE.read_text()
    assert text.startswith("# Using with PyTorch")
    code = "\n".join(BLOCK.findall(text))
    for needle in (".backward()", "torch.compile(", "fullgraph=True", "func.jacfwd", "func.jvp", "func.vmap",
                   "func.grad", "gradcheck"):
        assert needle in code, needle


@pytest.mark.parametrize("block", list(_blocks()))
def test_block_runs_and_prints_what_it_says(block):
    expected = [
        _normalize(line.split("#", 1)[1].split("--")[0])
        for line in block.splitlines()
        if line.lstrip().startswith("print(") and "#" in line
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(PAGE), "exec"), {"__name__": "__doc_block__"})
    if expected:
        printed = [_normalize(chunk) for chunk in re.split(r"\n(?=\S)", out.getvalue().strip())]
        assert printed == expected
