"""Differentiable magnitude pruning of an MLP on scikit-learn's digits, with `topk_torch.nn.TopkPruning`.

Three ways to train the same MLP (64-256-256-10, ReLU) on the bundled 8x8
digits (no download), and their test accuracy:

* dense: no pruning;
* hard: every weight matrix passed through the hard magnitude top-k, with
  straight-through gradients (``TopkPruning(s, hard=True)``);
* soft: every weight matrix passed through the sparse soft top-k in
  magnitude, ``soft_topk_mag(W, k)`` (``TopkPruning(s)``), exact zeros
  outside a support slightly larger than k.

Both pruned runs ramp the sparsity from 0 to its target over the first half
of training (the cubic schedule of Zhu and Gupta, 2017), then
`finalize_pruning` bakes an exactly k-sparse weight, ``k = round((1 - s) * numel)``
per matrix, and the finalized network is evaluated.

    python examples/pruning.py                   # full run (about a minute on 2 cores)
    python examples/pruning.py --quick           # smoke run, seconds
    python examples/pruning.py --update-docs     # full run, numbers and figure into docs/applications.md
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import (
    batches,
    check_args,
    digits_split,
    environment_line,
    markdown_table,
    parser,
    pyplot,
    save_outputs,
    seed_everything,
)
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from topk_torch.nn import TopkPruning, finalize_pruning

NAME = "pruning"


def make_mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def cubic_sparsity(target: float, step: int, ramp_steps: int) -> float:
    """Zhu and Gupta's schedule: from 0 to `target`, fast at first, then slowly."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return target
    return target * (1.0 - (1.0 - step / ramp_steps) ** 3)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(dim=1) == y).double().mean())
    model.train()
    return acc


def train(
    mode: str, sparsity: float, seed: int, data: tuple[torch.Tensor, ...], args, progress: tqdm,
) -> dict[str, float | int | str]:
    x_train, x_test, y_train, y_test = data
    seed_everything(seed)
    model = make_mlp(args.hidden)
    prunings: list[TopkPruning] = []
    if mode != "dense":
        for layer in linear_layers(model):
            pruning = TopkPruning(
                0.0, hard=mode == "hard", regularization_strength=args.strength, p=args.p,
            )
            parametrize.register_parametrization(layer, "weight", pruning)
            prunings.append(pruning)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(y_train) // args.batch_size)
    ramp = int(args.ramp * args.epochs * steps_per_epoch)
    step = 0
    for _ in range(args.epochs):
        for idx in batches(len(y_train), args.batch_size, rng):
            for pruning in prunings:
                pruning.sparsity = cubic_sparsity(sparsity, step, ramp)
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            step += 1
        progress.update(1)
        progress.set_postfix(run=f"{mode} {sparsity:.0%}", loss=f"{loss.item():.3f}")
    result: dict[str, float | int | str] = {"mode": mode, "sparsity": sparsity, "seed": seed}
    layers = linear_layers(model)
    result["numel"] = sum(layer.weight.numel() for layer in layers)
    if mode == "dense":
        result["test_accuracy"] = result["final_accuracy"] = accuracy(model, x_test, y_test)
        result["nonzeros"] = result["expected_nonzeros"] = sum(int((layer.weight != 0).sum()) for layer in layers)
        result["soft_support"] = result["nonzeros"]
        return result
    # Before finalizing: accuracy of the trained (soft) network and the size of its support.
    result["test_accuracy"] = accuracy(model, x_test, y_test)
    result["soft_support"] = sum(int((layer.weight != 0).sum()) for layer in layers)
    result["expected_nonzeros"] = sum(p.num_kept(layer.weight) for p, layer in zip(prunings, layers, strict=True))
    for layer in layers:
        finalize_pruning(layer)
    result["nonzeros"] = sum(int((layer.weight != 0).sum()) for layer in layers)
    result["final_accuracy"] = accuracy(model, x_test, y_test)
    return result


def summarize(results: list[dict]) -> list[dict]:
    """One row per (mode, sparsity): accuracies as mean and standard deviation over the seeds."""
    rows = []
    for mode, sparsity in dict.fromkeys((r["mode"], r["sparsity"]) for r in results):
        runs = [r for r in results if r["mode"] == mode and r["sparsity"] == sparsity]
        row = {"mode": mode, "sparsity": sparsity, "seeds": len(runs)}
        for key in ("test_accuracy", "final_accuracy"):
            values = 100 * np.array([r[key] for r in runs])
            row[key] = (float(values.mean()), float(values.std()))
        for key in ("soft_support", "nonzeros", "expected_nonzeros", "numel"):
            row[key] = sorted({r[key] for r in runs})
        rows.append(row)
    return rows


def figure(summary: list[dict]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    dense = next(r for r in summary if r["mode"] == "dense")
    ax.axhline(dense["final_accuracy"][0], color="gray", linestyle="--", label="dense")
    for mode, marker in (("hard", "s"), ("soft", "o")):
        rows = sorted((r for r in summary if r["mode"] == mode), key=lambda r: r["sparsity"])
        label = "hard top-k, straight-through" if mode == "hard" else "sparse soft top-k (TopkPruning)"
        ax.errorbar(
            [100 * r["sparsity"] for r in rows], [r["final_accuracy"][0] for r in rows],
            yerr=[r["final_accuracy"][1] for r in rows], marker=marker, capsize=3, label=label,
        )
    ax.set_xlabel("sparsity of every weight matrix (%)")
    ax.set_ylabel("test accuracy after finalizing (%)")
    ax.set_title(f"MLP on digits: magnitude pruning (mean ± std, {dense['seeds']} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> None:
    p = parser(NAME, __doc__)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98], help="target sparsities")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 40, 4 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="runs per setting, seeds seed, seed+1, ... (default 3, 1 with --quick)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width (default 256)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--ramp", type=float, default=0.5, help="fraction of training over which the sparsity ramps up")
    p.add_argument("--strength", type=float, default=0.1, help="regularization_strength of the soft operator")
    p.add_argument("--p", type=float, default=2.0, help="p of the soft operator (2: the soft band is scale-free)")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.quick:
        args.sparsities = [0.9, 0.95]
        args.epochs = 4 if args.epochs is None else args.epochs
        args.seeds = 1 if args.seeds is None else args.seeds
        args.hidden = min(args.hidden, 64)
    args.epochs = 40 if args.epochs is None else args.epochs
    args.seeds = 3 if args.seeds is None else args.seeds
    torch.set_num_threads(args.threads)
    x_train, x_test, y_train, y_test = digits_split(args.seed)
    data = (torch.from_numpy(x_train), torch.from_numpy(x_test), torch.from_numpy(y_train), torch.from_numpy(y_test))
    runs = [("dense", 0.0)] + [(mode, s) for s in args.sparsities for mode in ("hard", "soft")]
    seeds = [args.seed + i for i in range(args.seeds)]
    start = time.perf_counter()
    results = []
    with tqdm(total=len(runs) * len(seeds) * args.epochs, desc=NAME, unit="epoch") as progress:
        for seed in seeds:
            for mode, sparsity in runs:
                results.append(train(mode, sparsity, seed, data, args, progress))
    seconds = time.perf_counter() - start
    summary = summarize(results)

    def values(counts: list[int]) -> str:
        return ", ".join(str(c) for c in counts)

    rows = [
        [
            r["mode"], f"{r['sparsity']:.0%}", "{:.1f} ± {:.1f}".format(*r["test_accuracy"]),
            "{:.1f} ± {:.1f}".format(*r["final_accuracy"]), values(r["soft_support"]),
            f"{values(r['nonzeros'])} of {values(r['numel'])}", values(r["expected_nonzeros"]),
        ]
        for r in summary
    ]
    table = markdown_table(
        ["training", "sparsity", "test acc. trained (%)", "test acc. finalized (%)",
         "non-zeros trained", "non-zeros finalized", "k = Σ round((1 - s) · numel)"],
        rows,
    )
    note = environment_line(
        NAME, args,
        f"; MLP 64-{args.hidden}-{args.hidden}-10, {args.epochs} epochs, {len(seeds)} seeds (mean ± std), "
        f"soft operator p = {args.p:g}, regularization_strength = {args.strength:g}; {seconds:.0f} s",
    )
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds, "summary": summary,
               "results": results}
    save_outputs(NAME, args.out, payload, table, figure(summary), args.update_docs, note)


if __name__ == "__main__":
    main()
