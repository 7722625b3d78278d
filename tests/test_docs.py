"""Every Python block of the user docs runs, and what it prints matches its comments.

A line `print(expr)   # expected` must print `expected` (whitespace-normalized);
blocks without such comments only have to run.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/concepts.md", "docs/policy.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks():
    for page in PAGES:
        for i, block in enumerate(BLOCK.findall((ROOT / page).read_text())):
            yield pytest.param(block, id=f"{page}#{i}")


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"\s+\]", "]", re.sub(r"\[\s+", "[", text)).split())


@pytest.mark.parametrize("block", list(_blocks()))
def test_doc_block_runs_and_prints_what_it_says(block):
    expected = []
    for line in block.splitlines():
        if line.startswith("print(") and "#" in line:
            expected.append(_normalize(line.split("#", 1)[1].split("--")[0]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<doc>", "exec"), {})
    if expected:
        printed = [_normalize(chunk) for chunk in re.split(r"\n(?=\S)", out.getvalue().strip())]
        assert printed == expected
