"""Compile the Titans linear-memory Triton kernels (undertow/kernels/titans_memory/triton_linear_kernels.py)
for Hopper (sm_90) on a machine without a GPU and report what ptxas says: registers per thread, spill
bytes, shared memory. Catches compile errors the interpreter cannot see (tl.dot shapes, layouts, types);
nothing is executed. The compile and ptxas reading are scripts/sm90_compile.py's.

    python scripts/titans_sm90_compile.py                      # the benchmark setting: bf16, Dk = Dv = 128, chunk 64
    python scripts/titans_sm90_compile.py --dtype fp32 --bv 16 32 16 16 --warps 4

Needs Triton's bundled ptxas (the Linux x86-64 wheel carries it); numbers depend on the Triton version.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90_compile import child_script, compile_kernel, print_table  # noqa: E402

CHILD = child_script("from undertow.kernels.titans_memory import triton_linear_kernels",
                     'getattr(triton_linear_kernels, spec["kernel"])')

IO = ("Q", "K", "V")  # in the inputs' dtype; every other pointer is float32
POINTERS = ("W0", "S0", "M0", "CW", "CS", "C0", "FP", "P", "LAST", "PL", "R", "Y", "WST", "SST", "WF", "SF", "DY",
            "DWF", "DSF", "DWST", "DSST", "DQ", "DK", "DV", "DW0", "DS0", "DM0", "DCW", "DCS", "DC0", "DP", "DLAST",
            "DPL", "DR")


def kernels(args) -> dict[str, tuple[str, dict]]:
    """row label -> (kernel name, its constexprs): the four kernels, with and without documents."""
    common = {"BL": args.bl, "BK": args.bk, "IS_F32": args.dtype == "fp32"}
    rows = {}
    for docs in (False, True):
        for kernel, bv in zip(("_fwd_states", "_fwd_out", "_bwd_states", "_bwd_chunk"), args.bv):
            rows[kernel + (" (documents)" if docs else "")] = (kernel, {**common, "BV": bv, "HAS_DOCS": docs})
    return rows


def compile_one(name: str, constexprs: dict, args) -> dict:
    types = {n: f"*{args.dtype}" for n in IO} | {n: "*fp32" for n in POINTERS}
    spec = {"kernel": name, "constexprs": constexprs, "types": types, "warps": args.warps, "stages": args.stages}
    return compile_kernel(CHILD, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="q, k, v dtype")
    ap.add_argument("--bl", type=int, default=64, help="token tile (the chunk's next power of two, >= 16)")
    ap.add_argument("--bk", type=int, default=128, help="Dk tile (all of Dk)")
    ap.add_argument("--bv", type=int, nargs=4, default=[32, 64, 32, 32], metavar=("FWD_STATES", "FWD_OUT", "BWD_STATES",
                    "BWD_CHUNK"), help="each kernel's v tile (triton_linear.BLOCK_V)")
    ap.add_argument("--warps", type=int, default=8, help="num_warps (triton_linear.NUM_WARPS)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--only", default="", help="compile only the kernels whose label contains this")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"sm_90, {args.dtype}, BL={args.bl} BK={args.bk} BV={'/'.join(map(str, args.bv))} "
          f"warps={args.warps} stages={args.stages}")
    rows = ((name, compile_one(kernel, constexprs, args)) for name, (kernel, constexprs) in kernels(args).items()
            if args.only in name)
    sys.exit(0 if print_table(rows) else 1)


if __name__ == "__main__":
    main()
