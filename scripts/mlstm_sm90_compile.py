"""Compile the chunkwise mLSTM Triton kernels (undertow/kernels/mlstm/triton_chunk*.py) for Hopper (sm_90)
on a machine without a GPU and report what ptxas says: registers per thread, spill bytes, shared memory.
Catches compile errors the interpreter cannot see (tl.dot shapes, layouts, types); nothing is executed.

    python scripts/mlstm_sm90_compile.py                     # the benchmark setting: bf16, Dqk = Dv = 128, chunk 64
    python scripts/mlstm_sm90_compile.py --dtype fp32 --bv 32 --warps 8

Needs Triton's bundled ptxas (the Linux x86-64 wheel carries it); numbers depend on the Triton version.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90_compile import child_script, compile_kernel, print_table  # noqa: E402

CHILD = child_script("from undertow.kernels.mlstm import triton_chunk, triton_chunk_bwd",
                     'getattr(triton_chunk, spec["kernel"], None) or getattr(triton_chunk_bwd, spec["kernel"])')

IO = ("Q", "K", "V", "DH", "Hout")  # q, k, v, dh and h in the inputs' dtype
INT32 = ("SEG", "SARG")
FLOATS = ("scale", "eps")


def kernels(args) -> dict[str, tuple[str, dict]]:
    """row label -> (kernel name, its constexprs): every kernel, and the forward's other launch variants."""
    blocks = {"BL": args.bl, "BK": args.bk, "BV": args.bv, "IS_F32": args.dtype == "fp32"}
    return {
        "_chunk_states": ("_chunk_states", {**blocks, "HAS_INIT": True}),
        "_chunk_states (zero state)": ("_chunk_states", {**blocks, "HAS_INIT": False}),
        "_chunk_outputs": ("_chunk_outputs", {**blocks, "STORE": True}),
        "_chunk_outputs (no grad)": ("_chunk_outputs", {**blocks, "STORE": False}),
        "_chunk_dstates": ("_chunk_dstates", blocks),
        "_chunk_bwd_q": ("_chunk_bwd_q", blocks),
        "_chunk_bwd_kv": ("_chunk_bwd_kv", blocks),
    }


def compile_one(name: str, constexprs: dict, args) -> dict:
    types = {n: f"*{args.dtype}" for n in IO} | {n: "*i32" for n in INT32} | {n: "fp32" for n in FLOATS}
    for ptr in ("I", "F", "C0", "N0", "M0", "CS", "NS", "MS", "MT", "DEN", "INTER", "WG", "A1", "A2", "DCF", "DNF",
                "DCS", "DNS", "R1", "DD", "DQP", "DKP", "DV", "ROWP", "COLP", "DINTP"):
        types[ptr] = "*fp32"
    spec = {"kernel": name, "constexprs": constexprs, "types": types, "warps": args.warps, "stages": args.stages}
    return compile_kernel(CHILD, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="q, k, v dtype")
    ap.add_argument("--bl", type=int, default=64, help="token tile (the chunk's next power of two, >= 16)")
    ap.add_argument("--bk", type=int, default=128, help="Dqk tile (all of Dqk)")
    ap.add_argument("--bv", type=int, default=64, help="v tile (triton_chunk_common.BLOCK_V)")
    ap.add_argument("--warps", type=int, default=8, help="num_warps (triton_chunk_common.NUM_WARPS)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    args = ap.parse_args()
    print(f"sm_90, {args.dtype}, BL={args.bl} BK={args.bk} BV={args.bv} warps={args.warps} stages={args.stages}")
    rows = ((name, compile_one(kernel, constexprs, args)) for name, (kernel, constexprs) in kernels(args).items()
            if args.only in name)
    sys.exit(0 if print_table(rows) else 1)


if __name__ == "__main__":
    main()
