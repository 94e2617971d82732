"""CPU speed of the Titans memory's chunked form against its token-by-token reference (forward), at T = 2048.

    python scripts/bench_titans_cpu.py [--T 2048] [--batch 2] [--heads 4] [--dim 64] [--depth 1]
                                       [--chunk 64] [--trials 3] [--threads 1] [--backward]

Both compute the same function (the chunk-start rule of chunk `--chunk`: reference.py's spec of the
chunked form); the reference steps through the tokens one at a time, taking each inner gradient by
autograd. `--depth 1` is the linear memory (the issue's target shape), >= 2 the residual MLP
(hidden 2 * dim). Inputs: unit-norm keys/queries, gates as sigmoids of Gaussians, packed rows with
document boundaries. The median of `--trials` runs after one warm-up, one torch thread by default.
Prints a markdown table (with the command, machine and date) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import median_seconds, provenance  # noqa: E402

from undertow.kernels.titans_memory import IMPLEMENTATIONS  # noqa: E402



def make_inputs(B: int, T: int, H: int, D: int, depth: int) -> dict:
    dims = [D] + [2 * D] * (depth - 1) + [D]
    gate = lambda bias: torch.sigmoid(bias + torch.randn(B, T, H))  # noqa: E731
    return {"q": F.normalize(torch.randn(B, T, H, D), dim=-1), "k": F.normalize(torch.randn(B, T, H, D), dim=-1),
            "v": torch.randn(B, T, H, D), "theta": 0.1 * gate(-1.0), "eta": gate(2.0), "alpha": gate(-4.0),
            "init_weights": tuple(torch.randn(H, a, b) / a ** 0.5 for a, b in zip(dims[:-1], dims[1:])),
            "doc_ids": (torch.rand(B, T) < 1 / 512).cumsum(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("T", 2048), ("batch", 2), ("heads", 4), ("dim", 64), ("depth", 1), ("chunk", 64),
                          ("trials", 3), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = make_inputs(args.batch, args.T, args.heads, args.dim, args.depth)
    rows = []
    for name in ("reference", "chunked"):
        fn = IMPLEMENTATIONS[name]

        def forward():
            with torch.no_grad():
                fn(**inputs, chunk_size=args.chunk)

        def forward_backward():
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in ("q", "k", "v", "theta")}
            fn(**{**inputs, **leaves}, chunk_size=args.chunk).square().sum().backward()

        fwd = median_seconds(forward, min(args.trials, 3) if name == "reference" else args.trials)
        bwd = median_seconds(forward_backward, 1 if name == "reference" else args.trials) if args.backward else None
        rows.append((name, fwd, bwd))
    ref_fwd, ref_bwd = rows[0][1], rows[0][2]
    shape = f"B={args.batch} T={args.T} H={args.heads} D={args.dim} depth={args.depth} chunk={args.chunk}"
    print(provenance(args.threads))
    print("| op | shape | backend | forward (ms) | speedup | forward+backward (ms) | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, fwd, bwd in rows:
        fb = f"{bwd * 1e3:.1f} | {ref_bwd / bwd:.1f}x" if bwd is not None else "- | -"
        print(f"| titans_memory | {shape} | {name} | {fwd * 1e3:.1f} | {ref_fwd / fwd:.1f}x | {fb} |")


if __name__ == "__main__":
    main()
