"""Shared plumbing of the example scripts: arguments, data, seeding, outputs and the docs page.

Not a library module: the scripts import it from their own folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "applications.md"
DOCS_FIGURES = ROOT / "docs" / "figures"


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The common options: --seed, --quick, --out, --threads, --update-docs."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed of data split, initialization and batches (default 0)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (CI smoke test, under 30 s)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "examples" / "output" / name,
        help=f"folder for results.json, results.md and {name}.png (default examples/output/{name})",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--update-docs", action="store_true",
        help=f"also write the table into docs/applications.md (between the {name} markers) and the figure "
        "into docs/figures/ (full runs only)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.update_docs and args.quick:
        parser.error("--update-docs writes the numbers of a full run into the docs: drop --quick")
    if args.threads < 1:
        parser.error("--threads must be at least 1")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - scikit-learn and matplotlib read the global state
    torch.manual_seed(seed)


def digits_split(seed: int, test_size: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1], split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return x_train, x_test, y_train, y_test


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of one shuffled epoch (the last batch may be smaller)."""
    order = rng.permutation(n)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_outputs(
    name: str, out: Path, results: dict[str, Any], table: str, figure: Any, update_docs: bool, summary: str,
) -> None:
    """Write results.json, results.md and the figure into `out`; with `update_docs`, into the docs too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "results.md").write_text(table + "\n")
    figure_path = out / f"{name}.png"
    figure.savefig(figure_path, dpi=120, bbox_inches="tight")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {figure_path}")
    if update_docs:
        DOCS_FIGURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure_path, DOCS_FIGURES / f"{name}.png")
        block = f"{summary}\n\n{table}\n\n![{name} results](figures/{name}.png)"
        write_docs_section(name, block)
        print(f"updated {DOCS_PAGE.relative_to(ROOT)} ({name} section) and docs/figures/{name}.png")


def write_docs_section(name: str, block: str, page: Path = DOCS_PAGE) -> None:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in `page`."""
    text = page.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no '<!-- {name}:start -->' ... '<!-- {name}:end -->' markers")
    page.write_text(pattern.sub(lambda m: m.group(1) + block.strip() + "\n" + m.group(2), text))


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def environment_line(name: str, args: argparse.Namespace, extra: str = "") -> str:
    import torch

    return (
        f"Produced by `python examples/{name}.py --update-docs` (seed {args.seed}, "
        f"{args.threads} torch thread(s), torch {torch.__version__}, {os.cpu_count()} CPUs){extra}."
    )
