"""Compile the SSD Triton scan kernels for Hopper (sm_90) on a machine without a GPU and report what
ptxas says: registers per thread, spill bytes, shared memory. The first look at a kernel's cost
before a GPU run (docs/ssd_kernel_notes.md); nothing is executed.

    python scripts/ssd_sm90_compile.py                      # the benchmark setting: bf16, P=64, N=128, L=256
    python scripts/ssd_sm90_compile.py --m 32 --warps 8 --only scan_bwd
    python scripts/ssd_sm90_compile.py --heads 8 --prec 2   # 8 heads a backward program, bf16 operands

Needs Triton's bundled ptxas (the `triton` wheel for Linux x86-64 carries it). Numbers depend on the
Triton version (this machine's may differ from the GPU image's).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90_compile import child_script, compile_kernel  # noqa: E402

CHILD = child_script("from undertow.kernels.ssd import triton_bwd, triton_fwd",
                     'getattr(triton_fwd, spec["kernel"], None) or getattr(triton_bwd, spec["kernel"])')

PTR_TYPES = {  # bf16 inputs, as the benchmark: x, dy, B, C, y, dx in bf16; the rest float32 / int32
    "X": "*{io}", "DY": "*{io}", "B": "*{io}", "C": "*{io}", "K": "*{io}", "Y": "*{io}", "DX": "*{io}",
    "DT": "*fp32", "A": "*fp32", "SEG": "*i32", "STATES": "*fp32", "DS": "*fp32", "DC": "*fp32", "DA": "*fp32",
    "DB": "*fp32", "DDT": "*fp32", "DW": "*fp32", "DFINAL": "*fp32", "DINIT": "*fp32", "DEND": "*fp32",
    "DT_BIAS": "*fp32", "DSTEP": "*fp32", "DACUM": "*fp32", "DA_PART": "*fp32", "DBIAS_PART": "*fp32",
    "lo": "fp32", "hi": "fp32", "D": "*fp32", "DD": "*fp32", "OUT": "*fp32",
}


def kernels(args) -> dict[str, dict]:
    """kernel name -> its constexprs at the chosen setting."""
    blk = {"L": args.L, "BLOCK_M": args.m, "BLOCK_K": args.m, "BLOCK_P": args.P, "BLOCK_N": args.N, "PREC": args.prec}
    skip = {"HAS_D": True, "D_PER_P": False}
    raw = {"DY_RAW": True}
    outer = {"L": args.L, "BLOCK_L": args.m, "BLOCK_P": args.P, "BLOCK_N": args.N, "PREC": args.prec}
    return {
        "chunk_outer_kernel": {**outer, "FROM_END": True},
        "chunk_scan_fwd_kernel": {**blk, **skip},
        "chunk_scan_bwd_target_kernel": {**blk, **raw},
        "chunk_scan_bwd_source_kernel": {**blk, **skip, **raw},
        "scan_bwd_dc_kernel": {**blk, **raw},
        "scan_bwd_dx_kernel": {**blk, **skip},
        "scan_bwd_db_kernel": {**blk, **raw},
        "state_pass_bwd_kernel": {"L": args.L, "BLOCK": 1024, "CARRY_ONLY": True},
        "dt_prep_bwd_kernel": {"L": args.L, "BLOCK_L": args.L, "BLOCK_H": 16, "BLOCK_NB": 8, "HAS_BIAS": True,
                               "SOFTPLUS": True, "HAS_LIMIT": False, "HAS_W": True},
    }


def compile_one(name: str, constexprs: dict, args) -> dict:
    io = "bf16" if args.prec in (1, 2) else "fp16" if args.prec == 3 else "fp32"
    types = {k: v.format(io=io) for k, v in PTR_TYPES.items()}
    warps = args.bwarps if name.startswith(("scan_bwd", "chunk_scan_bwd")) and args.bwarps else args.warps
    warps = 8 if name.startswith("dt_prep") else warps  # as triton.py launches them
    # the benchmark's sizes: ints equal to 1 are constants of the launch (Triton specializes them)
    values = {"T": 2048, "Tp": 2048, "H": 32, "G": args.G, "P": args.P, "N": args.N, "nc": 2048 // args.L,
              "HP": args.heads, "PN": args.P * args.N}
    constexprs = {**constexprs, **{k: 1 for k, v in values.items() if v == 1}}
    spec = {"kernel": name, "constexprs": constexprs, "types": types, "warps": warps, "stages": args.stages,
            "values": values}
    return {**compile_kernel(CHILD, spec), "warps": warps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--P", type=int, default=64, help="head dim tile (BLOCK_P)")
    ap.add_argument("--N", type=int, default=128, help="state tile (BLOCK_N)")
    ap.add_argument("--L", type=int, default=256, help="chunk length")
    ap.add_argument("--m", type=int, default=64, help="token tile (BLOCK_M = BLOCK_K)")
    ap.add_argument("--prec", type=int, default=1, choices=(0, 1, 2, 3),
                    help="PREC of the dots: 1 tf32 (default for bf16 inputs), 2 bf16 operands, 0 float32 inputs")
    ap.add_argument("--G", type=int, default=1, help="groups (1 in the benchmark: a constant of the launch)")
    ap.add_argument("--heads", type=int, default=1, help="heads a backward program (HP; 1 is the default)")
    ap.add_argument("--warps", type=int, default=4, help="num_warps (Triton's default 4)")
    ap.add_argument("--bwarps", type=int, default=0, help="num_warps of the backward scan kernels (0: --warps)")
    ap.add_argument("--stages", type=int, default=3, help="num_stages (Triton's default 3 on sm_90)")
    ap.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    args = ap.parse_args()
    print(f"sm_90, P={args.P} N={args.N} L={args.L} m={args.m} G={args.G} heads={args.heads} PREC={args.prec} "
          f"warps={args.warps} "
          f"bwarps={args.bwarps or args.warps} stages={args.stages}")
    print("| kernel | warps | registers | spill stores B | spill loads B | stack B | shared KiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, constexprs in kernels(args).items():
        if args.only not in name:
            continue
        r = compile_one(name, constexprs, args)
        if "error" in r:
            print(f"| {name} | error: {r['error'][:120]} |||||")
        else:
            print(f"| {name} | {r['warps']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} | "
                  f"{r['stack']} | {r['shared_kib']} |", flush=True)


if __name__ == "__main__":
    main()
