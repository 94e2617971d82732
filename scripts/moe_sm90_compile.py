"""Compile the MoE grouped-GEMM Triton kernels (undertow/kernels/moe/triton_grouped_kernels.py) for Hopper
(sm_90) on a machine without a GPU and report what ptxas says: registers per thread, spill bytes, shared
memory. Catches compile errors the interpreter cannot see; nothing is executed. The compile and ptxas
reading are scripts/sm90_compile.py's.

    python scripts/moe_sm90_compile.py                 # bf16 at the shipped tiles (triton_grouped.ROWS_MM/WEIGHT_MM)
    python scripts/moe_sm90_compile.py --dtype fp32
    python scripts/moe_sm90_compile.py --rows-mm 128 256 64 8 4   # BM BN BK warps stages of _rows_mm

Launch variants as the JIT specializes them for contiguous tensors: unit strides are constants; the
backward's dX runs _rows_mm on W.transpose(1, 2) (W's unit stride on the K side). Needs Triton's bundled
ptxas (the Linux x86-64 wheel carries it); numbers depend on the Triton version.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90_compile import child_script, compile_kernel, print_table  # noqa: E402

CHILD = child_script("from undertow.kernels.moe import triton_grouped_kernels",
                     'getattr(triton_grouped_kernels, spec["kernel"])')
SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


def variants(args) -> dict[str, tuple[str, dict, dict]]:
    """row label -> (kernel, constexprs incl. the unit strides, its launch config)."""
    from undertow.kernels.moe import triton_grouped

    size = SIZES[args.dtype]
    rows = dict(triton_grouped.ROWS_MM[size])
    weight = dict(triton_grouped.WEIGHT_MM[size])
    if args.rows_mm:
        rows = dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), args.rows_mm))
    if args.weight_mm:
        weight = dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), args.weight_mm))
    precision = {"PRECISION": "tf32" if args.tf32 else "ieee"}
    return {
        "_rows_mm (y = x w)": ("_rows_mm", {"sxk": 1, "swn": 1, "syn": 1, **precision}, rows),
        "_rows_mm (dx = dy w^T)": ("_rows_mm", {"sxk": 1, "swk": 1, "syn": 1, **precision}, rows),
        "_weight_mm (dw = x^T dy)": ("_weight_mm", {"sxk": 1, "syn": 1, "swn": 1, **precision}, weight),
    }


def compile_one(kernel: str, constexprs: dict, cfg: dict, args) -> dict:
    types = {n: f"*{args.dtype}" for n in ("X", "W", "Y", "DY", "DW")}
    types |= {n: "*i32" for n in ("TILE_GROUP", "TILE_ROW", "OFFS")}
    # the benchmark's shape (K = d 2048, N = hidden 1024): every size and stride a multiple of 16
    values = {n: 1024 for n in ("N", "K", "sxm", "sxk", "swe", "swk", "swn", "sym", "syn") if n not in constexprs}
    blocks = {k: cfg[k] for k in ("BM", "BN", "BK")}
    spec = {"kernel": kernel, "constexprs": {**constexprs, **blocks}, "types": types, "values": values,
            "warps": cfg["num_warps"], "stages": cfg["num_stages"]}
    return compile_kernel(CHILD, spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=tuple(SIZES))
    ap.add_argument("--tf32", action="store_true", help="fp32: tl.dot in tf32 (allow_tf32) instead of ieee")
    ap.add_argument("--rows-mm", type=int, nargs=5, metavar="N", help="BM BN BK warps stages of _rows_mm")
    ap.add_argument("--weight-mm", type=int, nargs=5, metavar="N", help="BM BN BK warps stages of _weight_mm")
    args = ap.parse_args(argv)
    found = variants(args)
    for label, (_, _, cfg) in found.items():
        print(f"sm_90, {args.dtype}, {label}: {cfg}")
    rows = ((label, compile_one(kernel, constexprs, cfg, args)) for label, (kernel, constexprs, cfg) in found.items())
    sys.exit(0 if print_table(rows) else 1)


if __name__ == "__main__":
    main()
