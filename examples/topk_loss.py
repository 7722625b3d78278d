"""Top-k classification with `topk_torch.nn.topk_loss` on a synthetic 100-class problem.

The script generates a fine-grained classification task with inherent
ambiguity, the setting where top-5 accuracy is the meaningful metric: 100
classes in 20 super-classes of 5; an input is a noisy sample of its class's
prototype pushed through a fixed random non-linear map, and with probability
`--ambiguity` its label is replaced by another class of the same super-class
(in the training and the test data alike).  The same MLP is trained with

* cross-entropy, and
* the top-k loss ``topk_loss(scores, labels, k=5, ce_weight=...)``: cross-entropy
  mixed with ``-log`` of the soft membership of the true class in the top 5,
  read off ``soft_topk_mask(scores, 5)`` (see ``docs/applications.md``),

and evaluated by top-1 and top-5 accuracy on held-out data.

    python examples/topk_loss.py                   # full run
    python examples/topk_loss.py --quick           # smoke run, seconds
    python examples/topk_loss.py --update-docs     # full run, numbers and figure into docs/applications.md
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import (
    batches,
    check_args,
    environment_line,
    markdown_table,
    parser,
    pyplot,
    save_outputs,
    seed_everything,
)
from torch import nn
from tqdm import tqdm

from topk_torch.nn import topk_loss

NAME = "topk_loss"


def make_data(args, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Train and test sets of the synthetic fine-grained task (float32 inputs, int64 labels)."""
    classes, group = args.classes, args.group_size
    groups = classes // group
    dim = args.dim
    centers = rng.normal(scale=args.group_spread, size=(groups, dim))
    prototypes = np.repeat(centers, group, axis=0) + rng.normal(scale=args.class_spread, size=(classes, dim))
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(classes, size=n)
        latent = prototypes[labels] + rng.normal(size=(n, dim))
        x = np.tanh(latent @ mixing)
        swap = rng.random(n) < args.ambiguity
        other = (labels // group) * group + rng.integers(group, size=n)
        return x.astype(np.float32), np.where(swap, other, labels).astype(np.int64)

    x_train, y_train = sample(args.train_per_class * classes)
    x_test, y_test = sample(args.test_per_class * classes)
    return x_train, y_train, x_test, y_test


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def train(loss_name: str, seed: int, data, args, progress: tqdm) -> dict:
    x_train, y_train, x_test, y_test = data
    seed_everything(seed)
    model = nn.Sequential(
        nn.Linear(x_train.shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU(),
        nn.Linear(args.hidden, args.classes),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(args.epochs):
        for idx in batches(len(y_train), args.batch_size, rng):
            scores = model(x_train[idx])
            if loss_name == "cross-entropy":
                loss = nn.functional.cross_entropy(scores, y_train[idx])
            else:
                loss = topk_loss(scores, y_train[idx], k=args.k, ce_weight=args.ce_weight,
                                 regularization_strength=args.strength, p=args.p)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            test_scores = model(x_test)
        history.append((topk_accuracy(test_scores, y_test, 1), topk_accuracy(test_scores, y_test, 5)))
        progress.update(1)
        progress.set_postfix(run=f"{loss_name} seed={seed}", loss=f"{loss.item():.3f}", top5=f"{history[-1][1]:.3f}")
    return {"loss": loss_name, "seed": seed, "top1": history[-1][0], "top5": history[-1][1], "history": history}


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["loss"] for r in results):
        runs = [r for r in results if r["loss"] == name]
        row = {"loss": name, "seeds": len(runs)}
        for key in ("top1", "top5"):
            values = 100 * np.array([r[key] for r in runs])
            row[key] = (float(values.mean()), float(values.std()))
        for column, key in ((0, "best_top1"), (1, "best_top5")):
            values = 100 * np.array([max(h[column] for h in r["history"]) for r in runs])
            row[key] = (float(values.mean()), float(values.std()))
        row["history"] = (100 * np.mean([r["history"] for r in runs], axis=0)).tolist()
        rows.append(row)
    return rows


def figure(summary: list[dict], label: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for row, color in zip(summary, ("tab:blue", "tab:orange"), strict=False):
        history = np.asarray(row["history"])
        epochs = np.arange(1, len(history) + 1)
        name = "cross-entropy" if row["loss"] == "cross-entropy" else label
        ax.plot(epochs, history[:, 1], color=color, label=f"{name}: top-5")
        ax.plot(epochs, history[:, 0], color=color, linestyle="--", label=f"{name}: top-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"synthetic 100-class task (mean over {summary[0]['seeds']} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> None:
    p = parser(NAME, __doc__)
    p.add_argument("--classes", type=int, default=100, help="number of classes, at least 50 (default 100)")
    p.add_argument("--group-size", type=int, default=5, help="classes per super-class (default 5)")
    p.add_argument("--dim", type=int, default=32, help="input dimension (default 32)")
    p.add_argument("--ambiguity", type=float, default=0.4, help="probability of a label swap within the super-class")
    p.add_argument("--group-spread", type=float, default=0.7, help="scale of the super-class centers")
    p.add_argument("--class-spread", type=float, default=0.7, help="scale of the class offsets in a super-class")
    p.add_argument("--train-per-class", type=int, default=30)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 40, 3 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="runs per loss (default 3, 1 with --quick)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--k", type=int, nargs="+", default=[5], help="k of the top-k loss (several: a uniform mixture)")
    p.add_argument("--ce-weight", type=float, default=0.2, help="weight of cross-entropy in the top-k loss")
    p.add_argument("--strength", type=float, default=1.0, help="regularization_strength of soft_topk_mask")
    p.add_argument("--p", type=float, default=4.0 / 3.0, help="p of soft_topk_mask (default 4/3)")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.classes < 50:
        p.error("--classes must be at least 50")
    if args.classes % args.group_size:
        p.error("--classes must be a multiple of --group-size")
    if args.quick:
        args.epochs = 3 if args.epochs is None else args.epochs
        args.seeds = 1 if args.seeds is None else args.seeds
    args.epochs = 40 if args.epochs is None else args.epochs
    args.seeds = 3 if args.seeds is None else args.seeds
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = make_data(args, np.random.default_rng(args.seed))
    data = tuple(torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))
    k_text = ",".join(str(k) for k in args.k)
    label = f"top-k loss (k={k_text}, ce_weight={args.ce_weight:g})"
    seeds = [args.seed + i for i in range(args.seeds)]
    start = time.perf_counter()
    results = []
    with tqdm(total=2 * len(seeds) * args.epochs, desc=NAME, unit="epoch") as progress:
        for seed in seeds:
            for loss_name in ("cross-entropy", "top-k"):
                results.append(train(loss_name, seed, data, args, progress))
    seconds = time.perf_counter() - start
    summary = summarize(results)
    rows = [
        ["cross-entropy" if r["loss"] == "cross-entropy" else label,
         "{:.1f} ± {:.1f}".format(*r["top1"]), "{:.1f} ± {:.1f}".format(*r["top5"]),
         "{:.1f} ± {:.1f}".format(*r["best_top1"]), "{:.1f} ± {:.1f}".format(*r["best_top5"])]
        for r in summary
    ]
    table = markdown_table(
        ["training loss", "test top-1 (%)", "test top-5 (%)", "best epoch: top-1 (%)", "best epoch: top-5 (%)"], rows,
    )
    note = environment_line(
        NAME, args,
        f"; {args.classes} classes in super-classes of {args.group_size}, ambiguity {args.ambiguity:g}, "
        f"{args.train_per_class * args.classes} training and {args.test_per_class * args.classes} test samples, "
        f"MLP {args.dim}-{args.hidden}-{args.hidden}-{args.classes}, {args.epochs} epochs, {len(seeds)} seeds "
        f"(mean ± std), soft_topk_mask p = {args.p:.4g}, regularization_strength = {args.strength:g}; {seconds:.0f} s",
    )
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds, "summary": summary,
               "results": results}
    save_outputs(NAME, args.out, payload, table, figure(summary, label), args.update_docs, note)


if __name__ == "__main__":
    main()
