"""The Python blocks of the site's guide pages (docs/choosing.md, docs/faq.md) run and print what they say.

A line `print(expr)   # expected` must print `expected` (whitespace-normalized,
brackets' inner padding ignored); other blocks only have to run.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/choosing.md", "docs/faq.md"]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _squash(text: str) -> str:
    text = re.sub(r"\[\s+", "[", text)
    text = re.sub(r"\s+\]", "]", text)
    return " ".join(text.split())


def _cases():
    for page in PAGES:
        blocks = PYTHON_BLOCK.findall((ROOT / page).read_text())
        assert blocks, f"{page} has no python block"
        for number, block in enumerate(blocks):
            yield pytest.param(block, id=f"{page}-{number}")


@pytest.mark.parametrize("block", list(_cases()))
def test_block(block):
    wanted = [_squash(line.split("#", 1)[1]) for line in block.splitlines()
              if line.startswith("print(") and "#" in line]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        exec(compile(block, "<docs>", "exec"), {"__name__": "__docs__"})
    if wanted:
        got = [_squash(part) for part in re.split(r"\n(?=\S)", captured.getvalue().strip())]
        # blocks mix checked and unchecked prints: compare the checked ones, in order, at the end
        assert got[-len(wanted):] == wanted if len(got) >= len(wanted) else got == wanted
