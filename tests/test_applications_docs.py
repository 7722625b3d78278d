"""docs/applications.md: its Python blocks run, in order and in one namespace, and print what they say;
its generated sections (written by the example scripts) are in place.

A line ``print(expr)   # expected`` must print ``expected`` (whitespace-normalized).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "applications.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SECTIONS = ["pruning", "moe", "topk_loss"]


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"\s+\]", "]", re.sub(r"\[\s+", "[", text)).split())


def _expected(block: str) -> list[str]:
    return [_normalize(line.split("#", 1)[1].split("--")[0]) for line in block.splitlines()
            if line.startswith("print(") and "#" in line]


def test_page_covers_the_building_blocks():
    text = "\n".join(BLOCK.findall(PAGE.read_text()))
    for needed in ("TopkPruning", "finalize_pruning", "topk_prune", "topk_gates", "MoE(", "moe_layer", "capacity=",
                   "routing_stats", "topk_loss", "register_parametrization"):
        assert needed in text, needed


def test_python_blocks_run_and_print_what_they_say():
    import jax

    namespace: dict[str, object] = {"__name__": "docs_applications"}
    with jax.enable_x64(False):
        for number, block in enumerate(BLOCK.findall(PAGE.read_text()), start=1):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, f"{PAGE.name}, python block {number}", "exec"), namespace)
            expected = _expected(block)
            if expected:
                printed = [_normalize(chunk) for chunk in re.split(r"\n(?=\S)", out.getvalue().strip())]
                assert printed == expected, f"python block {number}"


@pytest.mark.parametrize("name", SECTIONS)
def test_generated_sections_are_in_place(name):
    text = PAGE.read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.DOTALL)
    assert match, f"markers of {name} missing"
    section = match.group(1)
    assert f"python examples/{name}.py --update-docs" in section
    assert "\n| " in section and "|---|" in section
    figure = re.search(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", section)
    assert figure and (ROOT / "docs" / figure.group(1)).is_file()
