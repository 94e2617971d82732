"""Compile the Titans linear-memory Triton kernels (undertow/kernels/titans_memory/triton_linear_kernels.py)
for Hopper (sm_90) on a machine without a GPU and report what ptxas says: registers per thread, spill
bytes, shared memory. Catches compile errors the interpreter cannot see (tl.dot shapes, layouts, types);
nothing is executed. Same method as scripts/mlstm_sm90_compile.py.

    python scripts/titans_sm90_compile.py                      # the benchmark setting: bf16, Dk = Dv = 128, chunk 64
    python scripts/titans_sm90_compile.py --dtype fp32 --bv 16 32 16 16 --warps 4

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
from undertow.kernels.titans_memory import triton_linear_kernels
spec = json.loads(sys.argv[1])
fn = getattr(triton_linear_kernels, spec["kernel"])
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
