"""Compile the chunkwise mLSTM Triton kernels (undertow/kernels/mlstm/triton_chunk*.py) for Hopper (sm_90)
on a machine without a GPU and report what ptxas says: registers per thread, spill bytes, shared memory.
Catches compile errors the interpreter cannot see (tl.dot shapes, layouts, types); nothing is executed.

    python scripts/mlstm_sm90_compile.py                     # the benchmark setting: bf16, Dqk = Dv = 128, chunk 64
    python scripts/mlstm_sm90_compile.py --dtype fp32 --bv 32 --warps 8

Needs Triton's bundled ptxas (the Linux x86-64 wheel carries it); numbers depend on the Triton version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from undertow.kernels.mlstm import triton_chunk, triton_chunk_bwd
spec = json.loads(sys.argv[1])
fn = getattr(triton_chunk, spec["kernel"], None) or getattr(triton_chunk_bwd, spec["kernel"])
constexprs = {k: v for k, v in spec["constexprs"].items() if k in fn.arg_names}
sig = {name: spec["types"].get(name, "i32") for name in fn.arg_names if name not in constexprs}
for name in constexprs:
    sig[name] = "constexpr"
aligned = [i for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")]
attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
out = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": spec["warps"], "num_stages": spec["stages"]})
print("SHARED", out.metadata.shared)
"""

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
    env = {**os.environ, "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": log.strip().splitlines()[-1] if log.strip() else f"exit {proc.returncode}"}
    last = lambda pattern: (re.findall(pattern, log) or [None])[-1]  # noqa: E731
    shared = last(r"SHARED (\d+)")
    return {"registers": last(r"Used (\d+) registers"), "spill_stores": last(r"(\d+) bytes spill stores"),
            "spill_loads": last(r"(\d+) bytes spill loads"),
            "shared_kib": round(int(shared) / 1024, 1) if shared else None}


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
    print("| kernel | registers | spill stores B | spill loads B | shared KiB |")
    print("|---|---:|---:|---:|---:|")
    failed = False
    for name, (kernel, constexprs) in kernels(args).items():
        if args.only not in name:
            continue
        r = compile_one(kernel, constexprs, args)
        if "error" in r:
            failed = True
            print(f"| {name} | error: {r['error'][:160]} | | | |", flush=True)
        else:
            print(f"| {name} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} | {r['shared_kib']} |",
                  flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
