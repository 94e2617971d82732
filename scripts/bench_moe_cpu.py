"""CPU speed of the dropless MoE computation: the grouped form (tokens sorted by expert; GEMM by
torch._grouped_mm where it runs, else one matmul per expert on the sorted rows) against the loop
over experts (the reference), forward and forward + backward.

    python scripts/bench_moe_cpu.py [--tokens 4096] [--d 512] [--hidden 1024] [--experts 8] [--top-k 2]
                                    [--trials 3] [--threads 1]

Routing from random scores (roughly even loads). Median of `--trials` after one warm-up. Prints a
markdown table (with the command, machine and date) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import median_seconds, provenance  # noqa: E402

from undertow.kernels.moe import grouped_mm_runs, moe_experts  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("tokens", 4096), ("d", 512), ("hidden", 1024), ("experts", 8), ("top-k", 2),
                          ("trials", 3), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, d, h, E, k = args.tokens, args.d, args.hidden, args.experts, args.top_k
    x = torch.randn(N, d)
    idx = torch.randn(N, E).topk(k, -1).indices
    weights = torch.softmax(torch.randn(N, k), -1)
    w = [torch.randn(E, d, h) / d**0.5, torch.randn(E, d, h) / d**0.5, torch.randn(E, h, d) / h**0.5]
    variants = [("reference (loop over experts)", dict(backend="reference")),
                ("grouped, split GEMM", dict(backend="chunked", gemm="split"))]
    if grouped_mm_runs("cpu", torch.float32):
        variants.append(("grouped, torch._grouped_mm", dict(backend="chunked", gemm="grouped_mm")))
    rows = []
    for name, kwargs in variants:
        def forward():
            with torch.no_grad():
                moe_experts(x, idx, weights, *w, **kwargs)

        def forward_backward():
            leaves = [t.clone().requires_grad_() for t in (x, weights, *w)]
            out = moe_experts(leaves[0], idx, leaves[1], *leaves[2:], **kwargs)
            out.square().sum().backward()

        rows.append((name, median_seconds(forward, args.trials), median_seconds(forward_backward, args.trials)))
    print(provenance(args.threads))
    print(f"| tokens x d x hidden, E, top-k | path | forward (ms) | speedup | forward+backward (ms) | speedup |")
    print("|---|---|---|---|---|---|")
    for name, fwd, fb in rows:
        print(f"| {N} x {d} x {h}, {E}, {k} | {name} | {fwd * 1e3:.1f} | {rows[0][1] / fwd:.2f}x | "
              f"{fb * 1e3:.1f} | {rows[0][2] / fb:.2f}x |")


if __name__ == "__main__":
    main()
