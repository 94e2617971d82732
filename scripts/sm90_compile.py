"""The sm90 compile scripts' shared part: compile one Triton kernel for Hopper (sm_90) in a child
process without a GPU, and read what ptxas reported (registers per thread, spill bytes, stack,
shared memory). Nothing is executed.

    from sm90_compile import child_script, compile_kernel, print_table   # scripts/ is on sys.path
    child = child_script("from undertow.kernels.mlstm import triton_chunk",
                         'getattr(triton_chunk, spec["kernel"])')
    compile_kernel(child, {"kernel": ..., "constexprs": {...}, "types": {arg: "*bf16", ...},
                           "warps": 8, "stages": 3})       # "values": {int arg: its size}, optional
        -> {"registers", "spill_stores", "spill_loads", "stack", "shared_kib"} or {"error": last log line}
    print_table((label, compile_kernel(child, spec)) for ...)   -> True if every kernel compiled

One place for it, so scripts/{mlstm,ssd,titans}_sm90_compile.py read ptxas the same way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

# one kernel a subprocess: ptxas prints its log to the process's stderr, which we capture
_CHILD = r"""
import sys, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
IMPORT
spec = json.loads(sys.argv[1])
fn = LOOKUP
constexprs = {k: v for k, v in spec["constexprs"].items() if k in fn.arg_names}
sig = {name: spec["types"].get(name, "i32") for name in fn.arg_names if name not in constexprs}
for name in constexprs:
    sig[name] = "constexpr"
# as the JIT specializes a launch: pointers 16-byte aligned, ints that are multiples of 16 marked so
# (ints only where the spec gives their "values")
values = spec.get("values", {})
aligned = [i for i, name in enumerate(fn.arg_names)
           if sig[name].startswith("*") or values.get(name, 1) % 16 == 0]
attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
out = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": spec["warps"], "num_stages": spec["stages"]})
print("SHARED", out.metadata.shared)
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: undertow imports


def child_script(import_line: str, lookup: str) -> str:
    """The child's program: `import_line` brings the kernels' modules, `lookup` (an expression of
    `spec`) finds the kernel named spec["kernel"]."""
    return _CHILD.replace("IMPORT", import_line).replace("LOOKUP", lookup)


def compile_kernel(child: str, spec: dict) -> dict:
    """Compile in a fresh process with an empty Triton cache (so ptxas runs and logs); the last
    value of each ptxas line (the kernel's, after any helper's)."""
    env = {**os.environ, "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-c", child, json.dumps(spec)], capture_output=True, text=True,
                              env=env, cwd=ROOT)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": log.strip().splitlines()[-1] if log.strip() else f"exit {proc.returncode}"}

    def last(pattern: str) -> int | None:
        found = re.findall(pattern, log)
        return int(found[-1]) if found else None

    shared = last(r"SHARED (\d+)")
    return {"registers": last(r"Used (\d+) registers"), "spill_stores": last(r"(\d+) bytes spill stores"),
            "spill_loads": last(r"(\d+) bytes spill loads"), "stack": last(r"(\d+) bytes stack frame"),
            "shared_kib": round(shared / 1024, 1) if shared is not None else None}


def print_table(rows) -> bool:
    """rows: (label, compile_kernel's result) pairs, printed as they come (a generator compiles one
    kernel a row). The table: registers, spill bytes, shared memory; True if every kernel compiled."""
    print("| kernel | registers | spill stores B | spill loads B | shared KiB |")
    print("|---|---:|---:|---:|---:|")
    ok = True
    for name, r in rows:
        if "error" in r:
            ok = False
            print(f"| {name} | error: {r['error'][:160]} | | | |", flush=True)
        else:
            print(f"| {name} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} | {r['shared_kib']} |",
                  flush=True)
    return ok
