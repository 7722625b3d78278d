"""Registers and spills of the threshold method's Triton kernels, compiled for a GPU without one.

Triton's compiler and the `ptxas` and `cuobjdump` its Linux wheel ships
compile the kernels (`topk_core._triton_rows.compile_ahead`) for an NVIDIA
architecture on any machine, GPU or not.  Per row length, operator and
exponent, the script prints the registers per thread and the stack bytes per
thread (spilled registers, in local memory) of the shipped block shape
(`block_shape`) and of alternatives: the figures the block shape was chosen
from.  The kernels compute in float64 whatever the input's dtype; these are
float32 inputs, with residuals (what a training step runs).

    python benchmarks/triton_registers.py                               # sm_90 (H100, H200)
    python benchmarks/triton_registers.py --arch 80                     # sm_80 (A100)
    python benchmarks/triton_registers.py --n 64 --p 4/3                # one row length and exponent
    python benchmarks/triton_registers.py --shipped                     # the shipped block shapes only
    python benchmarks/triton_registers.py --write docs/methods.md       # and update the docs page
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

import triton  # noqa: E402

from topk_core import _triton_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

# (n, BLOCK x ROWS x warps) of the alternatives; the shipped shape is added to each n.
ALTERNATIVES = {
    16: [(16, 64, 4), (16, 32, 4), (16, 16, 2)],
    64: [(64, 16, 4), (64, 8, 4), (64, 8, 8)],
    256: [(256, 4, 4), (256, 2, 4), (256, 1, 2)],
    1024: [(1024, 1, 4), (1024, 1, 8)],
    2048: [(2048, 1, 32)],
    4096: [(4096, 1, 32)],
}
EXPONENTS = {"2": 2.0, "4/3": 4.0, "3/2": 3.0}  # p: the conjugate exponent q the kernels take
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(kernel: object) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a compiled kernel, read from its cubin by `cuobjdump`."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":")[:2] for item in line.split() if ":" in item)
    return int(fields["REG"]), int(fields["STACK"])


def table(arch: int, lengths: list[int], exponents: dict[str, float], shipped_only: bool = False) -> str:
    """The Markdown table of registers / stack bytes for architecture `arch`, rows of `lengths` entries
    and `exponents` (p's name: q); the shipped block shapes alone with `shipped_only`."""
    head = [f"Compiled for sm_{arch} by Triton {triton.__version__} (no GPU needed); float32 rows, with "
            "residuals. Each cell: registers / stack bytes per thread (stack: spilled registers).", "",
            "| n | BLOCK x ROWS, warps | entries per thread | " + " | ".join(
                f"{op} p = {p}" for op in ("mask", "mag") for p in exponents) + " |",
            "|---|---|---|" + "---|" * (2 * len(exponents))]
    for n in lengths:
        shapes = [] if shipped_only else ALTERNATIVES.get(n, [])  # other lengths: the shipped shape alone
        shipped = _triton_rows.block_shape(n)
        for shape in [shipped, *(s for s in shapes if s != shipped)]:
            block, rows, warps = shape
            cells = []
            for op in ("mask", "mag"):
                for q in exponents.values():
                    kernel = _triton_rows.compile_ahead(op, n, q, "fp32", arch, shape=shape)
                    cells.append("{} / {}".format(*resource_usage(kernel)))
            label = f"{block} x {rows}, {warps}" + (" (shipped)" if shape == shipped else "")
            head.append(f"| {n} | {label} | {block * rows // (32 * warps)} | " + " | ".join(cells) + " |")
            print(head[-1], flush=True)
    return "\n".join(head)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="NVIDIA compute capability x 10 (80, 90, ...)")
    parser.add_argument("--n", default=",".join(map(str, ALTERNATIVES)), help="comma-separated row lengths")
    parser.add_argument("--p", default=",".join(EXPONENTS), help="comma-separated exponents")
    parser.add_argument("--shipped", action="store_true", help="the shipped block shapes only")
    parser.add_argument("--write", metavar="PAGE", help="also write the table into this Markdown page")
    args = parser.parse_args(argv)
    text = table(args.arch, [int(n) for n in args.n.split(",")], {p: EXPONENTS[p] for p in args.p.split(",")},
                 args.shipped)
    if args.write:
        write_section(args.write, f"triton_registers_sm{args.arch}", text)
    return text


if __name__ == "__main__":
    main()
