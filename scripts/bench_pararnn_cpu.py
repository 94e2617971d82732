"""CPU speed of ParaRNN's Newton solver (the "chunked" backend, `--iterations` steps) against the
reference per-step loop, forward only (issue 16's target: >= 20x at T = 2048, hidden 512): its
fused native pass (native_pararnn.cpp, float32) and its PyTorch form (what UNDERTOW_NATIVE=0 runs).

    python scripts/bench_pararnn_cpu.py [--T 2048] [--hidden 512] [--batch 1] [--iterations 3] [--threads 1]

Median of `--trials` runs after a warm-up (scripts/bench_timing.py), float32, no_grad, with
document boundaries and a carried-in state; recurrent weights of scale 0.1 (where 3 iterations
converge, the residual column shows it). Beside the wall time, the median CPU time of the calling
thread (time.thread_time; with --threads 1 all the work runs there): on a machine shared with other
jobs it leaves out the time the process waits for a core, so its ratio is the steadier one. With
--threads 2 the native pass splits its channel blocks over two threads: the CPU column is then the
calling thread's share (the blocks split evenly), and the wall column on a quiet machine is the
measurement; the reference loop runs at the same thread count. Prints a markdown table with the
command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import median_seconds  # noqa: E402

from undertow.kernels.pararnn import native as pararnn_native  # noqa: E402
from undertow.kernels.pararnn import pararnn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, T, D = args.batch, args.T, args.hidden
    doc_ids = (torch.rand(B, T) < 1 / 512).cumsum(1)
    pararnn_native._library()  # build (or load) the native pass now, not inside the first timed call
    print(f"`python {' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, {args.threads} torch "
          f"threads, torch {torch.__version__}, {datetime.date.today().isoformat()}, load average "
          f"{os.getloadavg()[0]:.1f} at the start\n")
    print("| cell | shape | backend | forward ms | speed-up | CPU ms | CPU speed-up | residual |")
    print("|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    for cell in ("gru", "lstm"):
        u = torch.randn(B, T, 3, D)
        a = torch.randn(3, D) * 0.1
        p = torch.randn(2, D) * 0.1 if cell == "lstm" else None
        init = torch.randn(B, D) * 0.5 if cell == "gru" else (torch.randn(B, D) * 0.5, torch.randn(B, D) * 0.5)

        def run(backend, **newton):
            with torch.no_grad():
                return pararnn(cell, u, a, p, initial_state=init, doc_ids=doc_ids, return_residual=True,
                               backend=backend, **newton)

        ref = median_seconds(lambda: run("reference"), args.trials, long_warm_up=2.0)
        ref_cpu = median_seconds(lambda: run("reference"), args.trials, clock=time.thread_time)
        newton_kwargs = dict(iterations=args.iterations, chunk_size=args.chunk_size)
        shape = f"B={B} T={T} D={D}"
        print(f"| {cell} | {shape} | reference (per-step loop) | {ref * 1e3:.1f} | 1.0x | {ref_cpu * 1e3:.1f} | "
              "1.0x | 0 |")
        for form, enabled in (("native", True), (f"PyTorch, chunk {args.chunk_size}", False)):
            pararnn_native.ENABLED = enabled
            fast = median_seconds(lambda: run("chunked", **newton_kwargs), args.trials, long_warm_up=2.0)
            fast_cpu = median_seconds(lambda: run("chunked", **newton_kwargs), args.trials, clock=time.thread_time)
            residual = run("chunked", **newton_kwargs)[1].item()
            print(f"| {cell} | {shape} | chunked (Newton, {args.iterations} it., {form}) | "
                  f"{fast * 1e3:.1f} | {ref / fast:.1f}x | {fast_cpu * 1e3:.1f} | {ref_cpu / fast_cpu:.1f}x | "
                  f"{residual:.1e} |", flush=True)
        pararnn_native.ENABLED = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
