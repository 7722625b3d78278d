"""The example scripts run end to end in --quick mode (each in a subprocess, outputs in a temporary folder).

Also: --help, the exact sparsity counts of the pruning example, the routing
statistics of the MoE example, and the MoE example's two-process
DistributedDataParallel run (torchrun, gloo on the loopback interface)
reaching the same accuracy as one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ["pruning", "moe", "topk_loss"]
TIMEOUT = 180  # seconds; a quick run takes well under 30 s on an idle 2-core machine


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "error"})
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, Path]:
    """Each script once with --quick, from outside the repository, outputs in a temporary folder."""
    outputs = {}
    for name in SCRIPTS:
        out = tmp_path_factory.mktemp(name)
        _run([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--seed", "0", "--out", str(out)], cwd=out)
        outputs[name] = out
    return outputs


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    result = _run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], cwd=ROOT)
    for option in ("--quick", "--seed", "--out", "--update-docs"):
        assert option in result.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_writes_its_outputs(quick_runs, name):
    out = quick_runs[name]
    assert (out / f"{name}.png").stat().st_size > 1000
    assert (out / "results.md").read_text().startswith("| ")
    results = json.loads((out / "results.json").read_text())
    assert results["results"]


def test_quick_run_refuses_to_update_docs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "pruning.py"), "--quick", "--update-docs", "--out", str(tmp_path)],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 2 and "drop --quick" in result.stderr


def test_pruning_counts(quick_runs):
    results = json.loads((quick_runs["pruning"] / "results.json").read_text())["results"]
    assert {r["mode"] for r in results} == {"dense", "hard", "soft"}
    assert {r["sparsity"] for r in results if r["mode"] != "dense"} == {0.9, 0.95}
    for r in results:
        assert r["nonzeros"] == r["expected_nonzeros"]  # exactly k after finalizing
        assert r["soft_support"] >= r["expected_nonzeros"]
        if r["mode"] != "dense":
            assert r["expected_nonzeros"] < r["numel"] * (1.0 - r["sparsity"]) + 3
        assert 0.0 <= r["final_accuracy"] <= 1.0


def test_moe_routing(quick_runs):
    results = json.loads((quick_runs["moe"] / "results.json").read_text())["results"]
    assert {(r["router"], r["k"]) for r in results} == {("hard", 1), ("soft", 1), ("hard", 2), ("soft", 2)}
    for r in results:
        if r["router"] == "hard":
            assert r["experts_per_token"] == r["k"]
        else:
            assert r["experts_per_token"] >= r["k"]
        assert r["load_imbalance"] >= 1.0


def test_topk_loss_accuracies(quick_runs):
    payload = json.loads((quick_runs["topk_loss"] / "results.json").read_text())
    assert int(payload["args"]["classes"]) >= 50
    for r in payload["results"]:
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_moe_ddp_two_processes_matches_one_process(quick_runs, tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(EXAMPLES / "moe.py"), "--quick", "--ddp", "--seed", "0",
         "--ks", "2", "--out", str(tmp_path)],
        cwd=tmp_path,
    )
    ddp = json.loads((tmp_path / "results.json").read_text())
    single = json.loads((quick_runs["moe"] / "results.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    # k = 2 only (each run seeds its own model and data order): half the training, same check.
    single_k2 = [one for one in single["results"] if one["k"] == 2]
    assert len(single_k2) == len(ddp["results"]) == 2
    for one, two in zip(single_k2, ddp["results"], strict=True):
        assert (one["router"], one["k"]) == (two["router"], two["k"])
        # float64 training; the gradients differ only by the summation order of the two half-batches.
        assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 1 / 450 + 1e-12
