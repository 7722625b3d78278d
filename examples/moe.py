"""A tiny sparse mixture-of-experts classifier on scikit-learn's digits, with `topk_torch.nn.MoE`.

Model: ``Linear(64, d) -> ReLU -> MoE(d, experts, k) -> Linear(d, 10)``, one
token per image; the MoE layer dispatches each token only to the experts
with a non-zero gate.  Two routers, for k = 1 and k = 2:

* hard: softmax, then the hard top-k of the probabilities (the usual router);
* soft: ``soft_topk_mag(softmax(logits), k)``, the sparse soft router, exact
  zeros outside a support of at least k experts, differentiable in the choice.

Reported: test accuracy, experts per token (mean over the test set), the
fraction of expert compute of a dense mixture, and the load balance (maximum
load over mean load, and the coefficient of variation of the load).

Data parallel: ``--ddp`` under torchrun trains the same model on several
processes (gloo backend, CPU) with DistributedDataParallel; every global
batch is split across the processes, so the result equals the one-process
run up to floating-point round-off.  A full run (without --quick) checks
this itself by launching the two-process run and reporting both accuracies.

    python examples/moe.py                       # full run, with the 2-process check
    python examples/moe.py --quick               # smoke run, seconds
    MASTER_ADDR=127.0.0.1 python -m torch.distributed.run --nproc_per_node 2 examples/moe.py --quick --ddp
    python examples/moe.py --update-docs         # full run, numbers and figure into docs/applications.md
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
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
from tqdm import tqdm

from topk_torch.nn import MoE, routing_stats

NAME = "moe"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MoEClassifier(nn.Module):
    def __init__(self, width: int, num_experts: int, k: int, hidden: int, hard: bool, strength: float, p: float):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.moe = MoE(width, num_experts, k, hidden, hard=hard, regularization_strength=strength, p=p)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class scores, gates and router logits (the router's linear map again, for the balance loss)."""
        h = torch.relu(self.embed(x))
        y, gates = self.moe(h, return_gates=True)
        return self.head(y), gates, self.moe.router.linear(h)


def balance_loss(gates: torch.Tensor, router_logits: torch.Tensor, batch_size: int, world: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (1 when balanced), on the global batch.

    ``f_e``: fraction of the token-expert assignments of the global batch that
    go to expert e (counted over all processes, no gradient); ``P_e``: mean
    router probability of expert e.  Written as a sum over the local tokens
    (divided by the global batch size, times `world`), so that the gradients
    averaged by DistributedDataParallel are those of one process.
    """
    counts = (gates.detach() != 0).sum(dim=0).to(router_logits.dtype)
    if world > 1:
        dist.all_reduce(counts)
    fraction = counts / counts.sum()
    probs = torch.softmax(router_logits, dim=-1).sum(dim=0)
    return gates.shape[1] * (fraction * probs).sum() * (world / batch_size)


def train(
    router: str, k: int, balance: float, seed: int, data, args, rank: int, world: int, progress: tqdm | None,
) -> dict:
    x_train, x_test, y_train, y_test = data
    seed_everything(seed)
    model = MoEClassifier(args.width, args.experts, k, args.hidden, router == "hard", args.strength, args.p)
    model = model.to(DTYPES[args.dtype])
    net: nn.Module = model
    if world > 1:
        # Experts that receive no token of a process's half-batch have no gradient there.
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    rng = np.random.default_rng(seed)
    for _ in range(args.epochs):
        for idx in batches(len(y_train), args.batch_size, rng):
            local = np.array_split(idx, world)[rank]
            logits, gates, router_logits = net(x_train[local])
            # Sum over the local samples / global batch size, times `world`: DDP averages the gradients
            # over the processes, so every step follows the gradient of the global batch mean.
            loss = nn.functional.cross_entropy(logits, y_train[local], reduction="sum") * (world / len(idx))
            if balance:
                loss = loss + balance * balance_loss(gates, router_logits, len(idx), world)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(run=f"{router} k={k} balance={balance:g} seed={seed}")
    model.eval()
    with torch.no_grad():
        logits, gates, _ = model(x_test)
    stats = routing_stats(gates)
    load = stats.load.double()
    return {
        "router": router, "k": k, "balance": balance, "seed": seed,
        "test_accuracy": float((logits.argmax(dim=1) == y_test).double().mean()),
        "experts_per_token": stats.mean_experts_per_token,
        "max_experts_per_token": int(stats.experts_per_token.max()),
        "load": stats.load.tolist(),
        "load_imbalance": stats.load_imbalance,
        "load_cv": float(load.std(unbiased=False) / load.mean()),
        "compute_fraction": stats.mean_experts_per_token / args.experts,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_environment(env: dict[str, str]) -> dict[str, str]:
    """Rendezvous and gloo traffic on the loopback interface only (no network needed)."""
    env = dict(env)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if env["MASTER_ADDR"] in ("127.0.0.1", "localhost") and "GLOO_SOCKET_IFNAME" not in env:
        if sys.platform.startswith("linux"):
            env["GLOO_SOCKET_IFNAME"] = "lo"
        elif sys.platform == "darwin":
            env["GLOO_SOCKET_IFNAME"] = "lo0"
    return env


def run_ddp_check(args, nproc: int = 2) -> list[dict]:
    """Launch this script under torchrun with --ddp on `nproc` processes; return its per-run results."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
            "--ddp", "--out", tmp, "--seed", str(args.seed), "--seeds", "1", "--epochs", str(args.epochs),
            "--dtype", args.dtype, "--ks", *map(str, args.ks), "--balance", *map(str, args.balance),
        ]
        if args.quick:
            command.append("--quick")
        env = loopback_environment({**os.environ, "OMP_NUM_THREADS": "1"})
        subprocess.run(command, check=True, env=env)
        return json.loads((Path(tmp) / "results.json").read_text())["results"]


def figure(summary: list[dict], num_experts: int):
    plt = pyplot()
    fig, (ax_acc, ax_load) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    labels = [f"{r['router']} k={r['k']}" + (f" bal={r['balance']:g}" if r["balance"] else "") for r in summary]
    colors = ["tab:blue" if r["router"] == "hard" else "tab:orange" for r in summary]
    ax_acc.bar(range(len(summary)), [r["test_accuracy"][0] for r in summary], yerr=[r["test_accuracy"][1] for r in summary],
               color=colors, capsize=3)
    low = min(r["test_accuracy"][0] - r["test_accuracy"][1] for r in summary)
    ax_acc.set_ylim(max(0.0, low - 5), 100)
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_xticks(range(len(summary)), labels, rotation=30, ha="right", fontsize=8)
    for i, r in enumerate(summary):
        ax_acc.annotate(f"{r['experts_per_token']:.2f}", (i, low - 4), ha="center", fontsize=8)
    ax_acc.set_title("accuracy (mean ± std); experts/token at the bottom", fontsize=10)
    shares = np.array([np.asarray(r["load"], dtype=float) / max(1, sum(r["load"])) for r in summary]) * 100
    image = ax_load.imshow(shares, cmap="viridis", aspect="auto", vmin=0)
    for (i, e), share in np.ndenumerate(shares):
        ax_load.text(e, i, f"{share:.0f}", ha="center", va="center", fontsize=7,
                     color="white" if share < 0.6 * shares.max() else "black")
    ax_load.set_xticks(range(num_experts))
    ax_load.set_yticks(range(len(summary)), labels, fontsize=8)
    ax_load.set_xlabel("expert")
    ax_load.set_title(f"load per expert, % of token-expert assignments (test set, first seed; balanced: {100 / num_experts:.1f})",
                      fontsize=10)
    fig.colorbar(image, ax=ax_load, fraction=0.03)
    fig.tight_layout()
    return fig


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for config in dict.fromkeys((r["router"], r["k"], r["balance"]) for r in results):
        runs = [r for r in results if (r["router"], r["k"], r["balance"]) == config]
        acc = 100 * np.array([r["test_accuracy"] for r in runs])
        row = {"router": config[0], "k": config[1], "balance": config[2], "seeds": len(runs),
               "test_accuracy": (float(acc.mean()), float(acc.std())), "load": runs[0]["load"]}
        for key in ("experts_per_token", "load_imbalance", "load_cv", "compute_fraction"):
            row[key] = float(np.mean([r[key] for r in runs]))
        row["max_experts_per_token"] = max(r["max_experts_per_token"] for r in runs)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(NAME, __doc__)
    p.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    p.add_argument("--width", type=int, default=32, help="token size (default 32)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of an expert (default 64)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2], help="experts per token of the routers (default 1 2)")
    p.add_argument("--balance", type=float, nargs="+", default=None,
                   help="weights of the load-balancing loss, one run each (default 0 0.1; 0 with --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                   help="training dtype (default float64: the 2-process run then matches the 1-process run)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 20, 3 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="runs per setting (default 3, 1 with --quick)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--strength", type=float, default=0.1, help="regularization_strength of the soft router")
    p.add_argument("--p", type=float, default=4.0 / 3.0, help="p of the soft router (default 4/3)")
    p.add_argument("--ddp", action="store_true", help="data parallel under torchrun (gloo, CPU); rank 0 writes the outputs")
    p.add_argument("--no-ddp-check", action="store_true", help="full runs: skip the 2-process DistributedDataParallel check")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.ddp and args.update_docs:
        p.error("--update-docs runs the 2-process check itself: run without --ddp")
    if args.quick:
        args.epochs = 3 if args.epochs is None else args.epochs
        args.seeds = 1 if args.seeds is None else args.seeds
        args.balance = [0.0] if args.balance is None else args.balance
    args.epochs = 20 if args.epochs is None else args.epochs
    args.balance = [0.0, 0.1] if args.balance is None else args.balance
    args.seeds = 3 if args.seeds is None else args.seeds
    torch.set_num_threads(args.threads)

    rank, world = 0, 1
    if args.ddp:
        os.environ.update(loopback_environment(dict(os.environ)))
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    x_train, x_test, y_train, y_test = digits_split(args.seed)
    dtype = DTYPES[args.dtype]
    data = (torch.from_numpy(x_train).to(dtype), torch.from_numpy(x_test).to(dtype), torch.from_numpy(y_train),
            torch.from_numpy(y_test))
    runs = [(router, k, balance) for balance in args.balance for k in args.ks for router in ("hard", "soft")]
    seeds = [args.seed + i for i in range(args.seeds)]
    start = time.perf_counter()
    results = []
    with tqdm(total=len(runs) * len(seeds) * args.epochs, desc=f"{NAME} rank {rank}/{world}" if args.ddp else NAME,
              unit="epoch", disable=rank != 0) as progress:
        for seed in seeds:
            for router, k, balance in runs:
                results.append(train(router, k, balance, seed, data, args, rank, world, progress))
    seconds = time.perf_counter() - start
    if args.ddp:
        dist.destroy_process_group()
        if rank != 0:
            return

    ddp_results = None
    if not (args.quick or args.ddp or args.no_ddp_check):
        ddp_results = run_ddp_check(args)
        for mine, theirs in zip(results, ddp_results, strict=False):  # the check runs the first seed
            mine["test_accuracy_ddp"] = theirs["test_accuracy"]
    summary = summarize(results)
    header = ["router", "k", "balance loss", "test accuracy (%)", "experts per token (max)", "expert compute vs dense",
              "max load / mean load", "load CV"]
    rows = []
    for r in summary:
        rows.append([
            r["router"], r["k"], f"{r['balance']:g}", "{:.1f} ± {:.1f}".format(*r["test_accuracy"]),
            f"{r['experts_per_token']:.2f} ({r['max_experts_per_token']})", f"{100 * r['compute_fraction']:.0f}%",
            f"{r['load_imbalance']:.2f}", f"{r['load_cv']:.2f}",
        ])
    if ddp_results is not None:
        header.append(f"seed {args.seed}: 1 process / 2-process DDP (%)")
        for row, r in zip(rows, summary, strict=True):
            run = next(run for run in results if "test_accuracy_ddp" in run
                       and (run["router"], run["k"], run["balance"]) == (r["router"], r["k"], r["balance"]))
            row.append(f"{100 * run['test_accuracy']:.2f} / {100 * run['test_accuracy_ddp']:.2f}")
    table = markdown_table(header, rows)
    note = environment_line(
        NAME, args,
        f"; {args.experts} experts of width {args.width}-{args.hidden}-{args.width}, {args.epochs} epochs, "
        f"{len(seeds)} seeds (mean ± std), soft router p = {args.p:.4g}, regularization_strength = {args.strength:g}"
        f"; {seconds:.0f} s of training{' on ' + str(world) + ' processes' if args.ddp else ' in one process'}",
    )
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "world_size": world, "seconds": seconds,
               "summary": summary, "results": results}
    save_outputs(NAME, args.out, payload, table, figure(summary, args.experts), args.update_docs, note)


if __name__ == "__main__":
    main()
