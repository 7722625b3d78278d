"""Smoke test of the benchmark suite: `benchmarks/run.py --quick` runs and writes its table and plots."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ._torch_helpers import triton_compiler_environment

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| framework | implementation | kind | computes | shape | first call (ms) | forward (ms) "
          "| fwd+bwd (ms) | forward / sort | peak memory (MB) |")


def _run(tmp_path: Path, *options: str) -> str:
    page = tmp_path / "bench.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--write", str(page), *options]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = page.read_text()
    assert "<!-- bench_suite_cpu:start -->" in text and "<!-- bench_suite_cpu:end -->" in text
    for name in ("bench_time_vs_n_cpu.png", "bench_time_vs_batch_cpu.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0
        assert f"](figures/{name})" in text
    return text


def _rows(text: str, framework: str) -> list[list[str]]:
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(f"| {framework} | `")]
    return [[cell.strip() for cell in row] for row in rows if len(row) == 10]


def test_numpy_quick_with_memory(tmp_path):
    text = _run(tmp_path, "--framework", "numpy")
    assert HEADER in text
    rows = _rows(text, "numpy")
    names = {row[1] for row in rows}
    for name in ("`np.sort`", "`np.argsort`", "`scipy isotonic_regression`", "`topk_numpy mask p=4/3 pav`",
                 "`topk_numpy mask p=4/3 threshold`", "`topk_numpy mag p=4/3 pav`"):
        assert name in names
    for row in rows:
        assert float(row[6]) > 0  # forward time
        assert row[9] != "n/a"  # peak memory measured
    assert "Time vs n" in text and "Time vs batch" in text and "Largest n" in text


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_framework_quick(tmp_path, framework):
    pytest.importorskip(framework)
    text = _run(tmp_path, "--framework", framework, "--operators", "mask", "--shapes", "1x1000,8x64",
                "--no-memory")
    assert HEADER in text
    rows = _rows(text, framework)
    kinds = {row[2] for row in rows}
    assert {"ours", "baseline"} <= kinds
    baseline = "`torch.topk`" if framework == "torch" else "`jax.lax.top_k (jit)`"
    hard = [row for row in rows if row[1] == baseline]
    assert hard and all(float(row[7]) > 0 for row in hard)  # the hard top-k's forward + backward too
    ours = [row for row in rows if row[2] == "ours"]
    assert ours and all(float(row[7]) > 0 for row in ours)  # forward + backward measured


def test_methods_option_keeps_only_the_methods_named(tmp_path):
    text = _run(tmp_path, "--framework", "numpy", "--operators", "mag", "--methods", "threshold", "--shapes", "8x64",
                "--no-memory")
    ours = {row[1] for row in _rows(text, "numpy") if row[2] == "ours"}
    assert "`topk_numpy mag p=4/3 threshold`" in ours
    assert all(name.endswith(" threshold`") for name in ours), ours


def test_gpu_target_lines_compare_forward_backward_with_the_hard_topk(monkeypatch):
    """The GPU report's target lines: each entry of ours at the target shape against the hard top-k."""
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    def entry(name, kind):
        return run.Entry("torch", name, kind, "", "", lambda x, k: x)

    shape = run.GPU_TARGET_SHAPE
    results = {"torch": {
        "entries": [entry("torch.sort", "baseline"), entry("torch.topk", "baseline"), entry("fast", "ours"),
                    entry("slow", "ours"), entry("failed", "ours")],
        "table": {("torch.sort", shape): {"both": None}, ("torch.topk", shape): {"both": 2.0},
                  ("fast", shape): {"both": 4.0}, ("slow", shape): {"both": 8.0}, ("failed", shape): {"error": "x"}},
    }}
    lines = run._gpu_target(results, argparse.Namespace(device="cuda", shapes=[shape]))
    assert "* `fast`: 2.00x `torch.topk` (met)" in lines
    assert "* `slow`: 4.00x `torch.topk` (missed)" in lines
    assert not any("failed" in line for line in lines)
    assert run._gpu_target(results, argparse.Namespace(device="cpu", shapes=[shape])) == []


def test_report_is_written_after_each_framework_in_the_order_given(tmp_path, monkeypatch):
    """A run cut short after its first framework (a GPU lease's limit) leaves that framework's report
    in the page; `--framework` takes a list, run in its order."""
    pytest.importorskip("jax")  # the report names the versions of the frameworks it ran
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    order = []

    def fake_run_framework(framework, args):
        order.append(framework)
        if len(order) == 2:
            raise KeyboardInterrupt  # the time limit's kill, as the second framework runs
        entry = run.Entry(framework, "fake sort", "baseline", "a sort", "", lambda x, k: x)
        table = {("fake sort", (1, 4096)): {"first": 1e-3, "forward": 2e-3, "both": None}}
        return {"entries": [entry], "table": table, "n_sweep": {}, "batch_sweep": {}, "memory": {},
                "sort": "fake sort"}

    monkeypatch.setattr(run, "run_framework", fake_run_framework)
    page = tmp_path / "bench.md"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--quick", "--framework", "jax,numpy", "--write", str(page)])
    assert order == ["jax", "numpy"]
    text = page.read_text()
    assert "| jax | `fake sort` | baseline |" in text and "a partial report, written after jax" in text
    with pytest.raises(SystemExit):
        run.main(["--framework", "jax,jax"])


def test_vector_width_child_measures_every_operator(monkeypatch):
    """`bench_vector_width.py`'s per-process measurement, on small shapes (the script compares two such runs)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_vector_width

    monkeypatch.setattr(bench_vector_width, "SHAPES", [(64, 16), (4, 256)])
    ratios = bench_vector_width.child(1)
    assert len(ratios) == 2 * 2 * len(bench_vector_width.EXPONENTS)
    assert all(fwd > 0 and both > 0 for fwd, both in ratios.values())


def test_strengths_table_has_a_row_per_case_and_restores_the_rule(monkeypatch):
    """`bench_strengths.py` on a small shape: every operator, exponent and strength, and the rule it
    switches off for one column is back afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_strengths

    from topk_core._pav import select

    rule = select.busy_lanes
    lines = bench_strengths.table([(256, 16)], 1)
    assert len(lines) == 2 + 2 * len(bench_strengths.EXPONENTS) * len(bench_strengths.STRENGTHS)
    assert all(float(cell) > 0 for line in lines[2:] for cell in line.strip("| ").split(" | ")[4:])
    assert select.busy_lanes is rule


def test_lanes_table_switches_every_lane_route_and_restores_the_limits(monkeypatch):
    """`bench_lanes.py` on small arrays and longer rows with a small k: its "off" column must switch off the
    small-k route as well (else both columns would time the lanes), and the limits are back afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_lanes

    from topk_core._pav import lanes, select

    monkeypatch.setattr(bench_lanes, "ENTRIES", 1 << 14)
    calls = []
    original = select.lane_rows
    monkeypatch.setattr(select, "lane_rows", lambda *a: calls.append(a[0].shape) or original(*a))
    limits = lanes.LANE_MAX_N, lanes.CUBIC_LANE_MAX_N, select.SMALL_K_LANE_MAX_N
    x = np.random.default_rng(0).normal(size=(128, 600)).astype(np.float32)
    bench_lanes._forward(x, 4, 4.0, False, False, False)()
    assert calls == []
    bench_lanes._forward(x, 4, 4.0, False, False, True)()
    assert calls
    lines = bench_lanes.table(1, 4, lengths=[600])
    assert len(lines) == 2 + 2 * len(bench_lanes.EXPONENTS)
    assert (lanes.LANE_MAX_N, lanes.CUBIC_LANE_MAX_N, select.SMALL_K_LANE_MAX_N) == limits
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["bench_lanes.py", "--k", "4", "--write", "page.md"])
        bench_lanes.main()


def test_gpu_check_script_smoke_run_on_the_cpu(tmp_path):
    """`benchmarks/gpu_check.sh`'s benchmark step, as a smoke run without a GPU (DEVICE=cpu QUICK=1)."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "QUICK": "1", "STEPS": "bench"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "== benchmark suite on cpu" in log and "status 0" in log
    page = (tmp_path / "benchmarks.md").read_text()
    assert "| torch | `torch.topk` |" in page
    assert (tmp_path / "figures" / "bench_time_vs_n_cpu.png").stat().st_size > 0


def test_ab_versions_copies_a_revision_and_the_working_tree(tmp_path):
    """`ab_versions.py` copies the core of a revision and of the working tree as packages of their own,
    rewriting only what changed and dropping files the version does not have."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ab_versions

    dest = tmp_path / "topk_core_b"
    (dest / "_pav").mkdir(parents=True)
    (dest / "_pav" / "stale.py").write_text("raise ImportError\n")
    ab_versions._copy_version(None, dest)
    for rel in ("__init__.py", "_api.py", "_pav/lanes.py"):
        assert (dest / rel).read_bytes() == (ROOT / "topk_core" / rel).read_bytes()
    assert not (dest / "_pav" / "stale.py").exists()
    lanes = dest / "_pav" / "lanes.py"
    stamp = lanes.stat().st_mtime_ns
    ab_versions._copy_version(None, dest)  # unchanged files are not rewritten (Numba's cache keys on them)
    assert lanes.stat().st_mtime_ns == stamp
    head = tmp_path / "topk_core_a"
    ab_versions._copy_version("HEAD", head)
    assert (head / "_pav" / "lanes.py").exists()
    assert b"def lane_rows" in (head / "_pav" / "lanes.py").read_bytes()


def test_threshold_iterations_counts_the_loop_and_each_rows_convergence(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import threshold_iterations

    rows = threshold_iterations.main(["--shapes", "64x16", "--p", "4/3"])
    assert [row[:2] for row in rows] == [("mask", "4/3"), ("mag", "4/3")]
    for _, _, shape, k, count, median, tail, every in rows:
        assert shape == (64, 16) and k == 1
        assert 1 <= median <= tail <= count <= 100  # the loop runs until its slowest row has converged
        assert every[0] == count and len(every) in (1, 2, 3)  # the mask's recentring: one or two more loops
    # Rows do not interact: one row alone takes the iterations at which it converged in the batch.
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    count, converged = threshold_iterations.loop_iterations("mask", x, 1, 0.1, 4.0 / 3.0)
    assert count == converged.max()
    assert threshold_iterations.loop_iterations("mask", x[:1], 1, 0.1, 4.0 / 3.0)[0] == converged[0]
    # p > 2 solves every row again next to a key: one more loop (the mask's rows far below their maximum
    # find that key in one more).
    assert len(threshold_iterations.every_loop_iterations("mask", x, 1, 0.1, 3.0)) in (2, 3)
    assert len(threshold_iterations.every_loop_iterations("mag", x, 1, 0.1, 3.0)) == 2


def test_threshold_sweep_counts_iterations_and_compares_versions(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import threshold_sweep

    monkeypatch.setattr(threshold_sweep, "SHAPES", ((16, 12, 2),))
    saved = tmp_path / "counts.json"
    cases = threshold_sweep.main(["iterations", "--save", str(saved)])
    assert len(cases) == 7 * 2 * 2 * 3 * 2  # kinds, dtypes, operators, exponents, strengths
    assert all(1 <= count <= 100 for count in cases.values())
    again = threshold_sweep.main(["iterations", "--against", str(saved)])
    assert again == cases  # deterministic: the same rows and counts in every run
    assert "geometric mean of the ratios 1.000" in capsys.readouterr().out
    every = threshold_sweep.main(["iterations", "--loops", "every"])
    assert all(every[case] >= count for case, count in cases.items())
    assert any(every[case] > count for case, count in cases.items() if "p=3" in case)


def test_threshold_sweep_of_outputs_against_pav(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import threshold_sweep

    worst = threshold_sweep.main(["accuracy", "--rows", "7"])
    assert len(worst) == 2 * 4 * 2  # operators, exponents, dtypes
    for (_, _, dtype), value in worst.items():
        assert value < (1e-4 if dtype == "float32" else 1e-12), (dtype, value)


def test_pav_vs_threshold_fuzz(monkeypatch):
    """`pav_vs_threshold.py` (the figures of docs/methods.md on PAV up to p = 8 and its refusal above) on short
    rows: the two exact methods agree up to p = 8, outputs and VJPs; PAV's kernel misses at p = 200 (on these
    normal rows it meets k at p = 50 since its splits toward a key go to the key)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import pav_vs_threshold

    monkeypatch.setattr(pav_vs_threshold, "SHAPES", ((9, 3, 20),))
    worst = pav_vs_threshold.main(["--p", "3,4,8", "--kinds", "normal,tinyties,span"])
    assert set(worst) == {(op, p) for op in ("mask", "mag") for p in (3.0, 4.0, 8.0)}
    assert all(dev < 1e-12 and warned == 0 for dev, *_, warned in worst.values()), worst
    vjp = pav_vs_threshold.main(["--vjp", "--p", "1.25,2,6", "--kinds", "normal,spread,dominant"])
    assert all(dev < 1e-6 for dev, *_ in vjp.values()), vjp
    far = pav_vs_threshold.main(["--p", "200", "--kinds", "normal"])
    assert max(dev for dev, *_ in far.values()) > 1e-3


def test_route_agreement_stays_within_the_documented_bound(monkeypatch):
    """`route_agreement.py` (the figures of docs/methods.md on the lane solver's absolute frame) on 2,500 rows:
    every short-row route within the bound of the full-sort route (25,000 times it before 2026-12-07)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import route_agreement

    assert route_agreement.main(["--rows", "2500", "--seed", "1"]) <= 1.0


def test_deep_rows_table(monkeypatch):
    """`deep_rows.py` (the figures of docs/methods.md on `threshold._mag_deep_frames`) on a few rows: a line per
    dtype and p, within the tests' bounds (its `--no-deep-frames` switches a module constant off: not run
    in this process)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import deep_rows

    worst = deep_rows.main(["--rows", "6", "--p", "4/3,2"])
    assert set(worst) == {(dtype, p) for dtype in ("float32", "float64") for p in (4.0 / 3.0, 2.0)}
    assert all(value < (1e-5 if dtype == "float32" else 1e-12) for (dtype, _), value in worst.items()), worst


def test_op_count_counts_top_level_operations_syncs_and_root_evaluations(monkeypatch):
    """`op_count.py`'s counters on calls whose counts are known, and on the threshold method."""
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import op_count

    import topk_torch

    a = torch.ones(3)
    assert op_count.count_ops(lambda: (a + a).sum().item()) == (3, 1)  # add, sum, item (a sync)
    x = torch.randn(8, 16)
    assert op_count.count_evaluations(lambda: topk_torch.soft_topk_mask(x, 3, method="threshold")) > 0
    assert op_count.count_evaluations(lambda: topk_torch.soft_topk_mask(x, 3, method="pav")) == 0


def test_fused_threshold_benchmark_runs_and_matches_eager(monkeypatch):
    """`bench_fused_threshold.py`'s plumbing, with Dynamo alone (`--backend eager`: no compiler, seconds):
    the compiled loop gives the eager loop's numbers; PAV is timed only below `--pav-below` entries."""
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_fused_threshold

    rows = bench_fused_threshold.main(["--shapes", "8x16,2x16", "--p", "4/3", "--operators", "mag", "--backend",
                                       "eager", "--repeats", "1", "--pav-below", "100", "--breakdown"])
    assert [r["shape"] for r in rows] == [(8, 16), (2, 16)]
    assert all(r["dy"] == r["dg"] == 0.0 and r["compiled"] > 0 and r["eager"] > 0 and r["topk"] > 0 for r in rows)
    assert math.isnan(rows[0]["pav"]) and math.isnan(rows[0]["dg pav"])
    assert rows[1]["pav"] > 0 and 0 <= rows[1]["dg pav"] < 1e-4  # float32 eager threshold against PAV
    split = rows[0]["breakdown"]
    assert any(name.startswith("step x") for name in split) and any(name.startswith("_mag_frame x1") for name in split)
    assert split["rest"] > 0 and abs(sum(v for name, v in split.items() if name != "total") - split["total"]) < 1e-9
    # The Triton kernels' columns are measured on CUDA only.
    assert all(math.isnan(r[c]) for r in rows for c in bench_fused_threshold.TRITON_COLUMNS)


def test_fused_threshold_benchmark_without_the_compiled_loop(monkeypatch):
    """`--no-compiled` (a short GPU run): the compiled loop's columns are not measured, the others are."""
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_fused_threshold

    rows = bench_fused_threshold.main(["--shapes", "8x16", "--p", "2", "--operators", "mask", "--repeats", "1",
                                       "--no-compiled"])
    assert len(rows) == 1 and rows[0]["eager"] > 0 and rows[0]["topk"] > 0 and rows[0]["pav"] > 0
    assert all(math.isnan(rows[0][c]) for c in ("first", "dy", "dg", "compiled", "forward"))


def test_triton_registers_reads_the_compiled_kernels():
    """`triton_registers.py` compiles for sm_90 without a GPU (in a process of its own: this one imported the
    kernels under Triton's interpreter) and reads registers and stack bytes off the cubin."""
    pytest.importorskip("triton", minversion="3.2")
    script = str(ROOT / "benchmarks" / "triton_registers.py")
    done = subprocess.run([sys.executable, script, "--n", "16,100", "--p", "2", "--shipped"],
                          env=triton_compiler_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith(("| 16 |", "| 100 |"))]
    assert len(table) == 2 and all("(shipped)" in line for line in table)
    assert "| 100 | 128 x 2, 4 (shipped) | 2 |" in table[1]
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")][3:]
        registers, stack = zip(*(map(int, c.split(" / ")) for c in cells), strict=True)
        assert len(cells) == 2 and all(16 <= r <= 255 for r in registers) and all(s >= 0 for s in stack)


def test_triton_iterations_reads_the_kernels_status(monkeypatch):
    """`triton_iterations.py` (Triton's interpreter without a GPU): the rows' iterations, none handed back."""
    pytest.importorskip("torch")
    pytest.importorskip("triton", minversion="3.2")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import triton_iterations

    rows = triton_iterations.main(["--shapes", "40x16", "--k", "3", "--p", "2"])
    assert [row[:4] for row in rows] == [("mask", "2", (40, 16), 3), ("mag", "2", (40, 16), 3)]
    for *_, median, tail, most, handed_back, slowest in rows:
        assert 0 <= median <= tail <= most <= 100 and handed_back == 0 and median <= slowest <= most
    x = np.random.default_rng(0).normal(size=(4, 16))
    x[1, 2] = np.nan
    assert list(triton_iterations.row_iterations("mask", x, 3, 0.1, 2.0) < 0) == [False, True, False, False]


def test_ab_versions_k_is_the_tables_unless_given(monkeypatch):
    """`ab_versions.py --k`: the k of every call, max(2, n/8) (the benchmarks' tables) by default."""
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_versions

    assert ab_versions._k(argparse.Namespace(k=None), 64) == 8
    assert ab_versions._k(argparse.Namespace(k=None), 8) == 2
    assert ab_versions._k(argparse.Namespace(k=5), 512) == 5


def test_ab_versions_parts_are_the_halves_of_forward_vjp(monkeypatch):
    """`ab_versions.py --parts`: the forward with residuals gives what forward+VJP's forward gives, and the VJP
    from the residuals computed once what forward+VJP returns."""
    import topk_core as tc

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_versions

    rng = np.random.default_rng(0)
    x, u = rng.normal(size=(2, 6, 16)).astype(np.float32)
    for op in ("mask", "mag"):
        forward, vjp = ab_versions._parts(tc, op, x, u, 3, 4.0 / 3.0, 0.1)
        _, with_vjp = ab_versions._calls(tc, op, x, u, 3, 4.0 / 3.0, 0.1)
        want_y = getattr(tc, f"soft_topk_{op}")(x, 3, p=4.0 / 3.0, regularization_strength=0.1)
        np.testing.assert_array_equal(forward()[0], want_y)
        np.testing.assert_array_equal(vjp(), with_vjp())


def test_ab_versions_fresh_times_each_version_in_processes_of_its_own(monkeypatch, capsys, tmp_path):
    """`ab_versions.py --fresh`: a child process times one version (here np.sort, which needs no copy of the
    core) and prints best, median and page faults per call; the parent alternates the children and prints
    each run as ratios to the best np.sort."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_versions

    child = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_versions.py"), "-", "--child", "sort",
                            "--shape", "64x16", "--rounds", "3"], capture_output=True, text=True, timeout=120,
                           check=True)
    best, median, faults = (float(v) for v in child.stdout.split())
    assert 0 < best <= median and faults >= 0

    order = []
    times = {"sort": "2.000 2.500 0", "A": "4.000 5.000 1800", "B": "3.000 3.200 7"}

    real_run = subprocess.run

    def fake_run(command, **kwargs):
        if "--child" not in command:
            return real_run(command, **kwargs)  # the copies of the versions (git archive, tar)
        name = command[command.index("--child") + 1]
        order.append(name)
        return subprocess.CompletedProcess(command, 0, stdout=f"compiling\n{times[name]}\n")

    monkeypatch.setattr(ab_versions.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["ab_versions.py", "HEAD", "--fresh", "2", "--shape", "64x16",
                                     "--workdir", str(tmp_path)])
    ab_versions.main()
    assert order == ["sort", "A", "B", "B", "A", "sort"]
    lines = capsys.readouterr().out.splitlines()
    assert "np.sort 2.00 ms" in lines[0]
    assert lines[1].split()[:3] == ["A", "best", "2.000x"] and lines[1].endswith("1800 page faults per call")
    assert lines[3].split()[:3] == ["B", "best", "1.500x"] and "median 1.600x" in lines[3]


def test_compiled_backward_benchmark(tmp_path):
    """`bench_torch_compiled.py` with AOTAutograd alone (`--backend aot_eager`: traced, no compiler): a row per
    shape and operator, and the magnitude's compiled gradient equal to the eager one (the Numba product)."""
    pytest.importorskip("torch")
    page = tmp_path / "page.md"
    page.write_text("<!-- bench_torch_compiled:start -->\n<!-- bench_torch_compiled:end -->\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_torch_compiled.py"), "--quick", "--backend", "aot_eager",
           "--write", str(page)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in page.read_text().splitlines()
            if line.startswith("| (")]
    assert [(r[0], r[1]) for r in rows] == [(s, op) for s in ("(512, 16)", "(16, 256)") for op in ("mask", "mag")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert all(float(r[6]) == 0.0 for r in rows if r[1] == "mag")
    assert all(float(r[7]) < 1e-4 for r in rows)


def test_jax_products_benchmark(tmp_path):
    """`bench_jax_products.py --quick`: both products' times and their agreement, and, where JAX has
    `buffer_callback`, the forward through it and through `jax.pure_callback`."""
    pytest.importorskip("jax")
    page = tmp_path / "page.md"
    page.write_text("<!-- bench_jax_products:start -->\n<!-- bench_jax_products:end -->\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_jax_products.py"), "--quick", "--write", str(page)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in page.read_text().splitlines()
             if line.startswith("| (")]
    products = [c for c in cells if len(c) == 6]
    assert [(c[0], c[1]) for c in products] == [(s, op) for s in ("(64, 16)", "(1024, 16)") for op in ("mask", "mag")]
    assert all(float(c[2]) > 0 and float(c[3]) > 0 and float(c[5]) < 1e-4 for c in products)
    from topk_jax import _host_call

    callbacks = [c for c in cells if len(c) == 10]
    assert len(callbacks) == (2 if _host_call._buffer_callback is not None else 0)


def test_fp_mode_benchmark_times_both_modes_and_restores_the_switch(monkeypatch):
    """`bench_fp_mode.py --quick`: the forward and gradient with and without the switch, and the adapter's
    switch back in place afterwards."""
    pytest.importorskip("jax")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_fp_mode

    from topk_core._fpmode import subnormals_kept
    from topk_jax import _host_call

    results = bench_fp_mode.main(["--quick"])
    assert list(results) == [(8, 16)]
    assert all(0 < seconds < 1 for seconds in results[(8, 16)].values()) and len(results[(8, 16)]) == 4
    assert _host_call.subnormals_kept is subnormals_kept


def test_first_call_runs_two_processes_on_one_cache_folder(monkeypatch, capsys, tmp_path):
    """`first_call.py`: with `--cache empty` both processes get the same new, empty `NUMBA_CACHE_DIR`
    (the second one loads what the first wrote); with `--cache default` neither sets it; a folder given is
    taken as it is."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import first_call

    seen = []

    def fake_child(settings, cache_dir):
        seen.append((settings, cache_dir, None if cache_dir is None else os.listdir(cache_dir)))
        return {"import": 0.5, "first": 40.0 if len(seen) == 1 else 0.3, "later": 0.002}

    monkeypatch.setattr(first_call, "run_child", fake_child)
    first_call.main(["--op", "mask", "--p", "2", "--shape", "64x40", "--dtype", "float64", "--vjp"])
    (s1, dir1, files1), (s2, dir2, _) = seen
    assert dir1 == dir2 and files1 == [] and not os.path.exists(dir1)  # one folder, new and empty; removed after
    assert s1 == s2 and s1["p"] == 2.0 and s1["k"] == 4 and s1["shape"] == (64, 40) and s1["vjp"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| first") or
            line.startswith("| second")]
    assert rows == ["| first | empty | 0.50 | 40.00 | 2 |", "| second | as written | 0.50 | 0.30 | 2 |"]
    seen.clear()
    first_call.main(["--cache", "default"])
    assert [cache for _, cache, _ in seen] == [None, None]
    seen.clear()
    first_call.main(["--cache", str(tmp_path)])
    assert [cache for _, cache, _ in seen] == [str(tmp_path)] * 2
    assert capsys.readouterr().out.count("| given folder |") == 2


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_first_call_child_times_a_new_process(framework, monkeypatch):
    """The child process itself, forward and VJP, on the package's own cache (warm in the suite)."""
    pytest.importorskip(framework)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import first_call

    settings = {"framework": framework, "op": "mag", "p": 4.0 / 3.0, "shape": (64, 16), "dtype": "float64", "k": 2,
                "vjp": True, "repeats": 2}
    times = first_call.run_child(settings, None)
    assert set(times) == {"import", "first", "later"} and all(t > 0 for t in times.values())


def test_mag_entrywise_fuzz_finds_no_row_beyond_the_bound(monkeypatch):
    """`mag_entrywise.py` (the figures of docs/methods.md "Solved after commit 34ed5bf") on 300 batches: no
    row where either exact method is beyond the bound of the 600-digit oracle (at 34ed5bf: 3 rows of each)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import mag_entrywise

    assert mag_entrywise.main(["--batches", "300", "--seed", "1"]) == {"pav": (0, 0.0), "threshold": (0, 0.0)}
