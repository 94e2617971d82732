"""GPU speed of ParaRNN's "triton" backend (Newton, `--iterations` steps, Triton scans) against the
sequential PyTorch loop (the reference backend) on one GPU (issue 16's target: >= 300x at T = 4096).
Prints a markdown table with the command, machine and date.

    python scripts/bench_pararnn_gpu.py [--batch 4] [--T 4096] [--hidden 1024] [--iterations 3]
                                        [--reps 10] [--loop-reps 2] [--out DIR]

Forward and forward+backward ms (CUDA events, L2 flushed before each call: bench_ssd.cuda_ms), float32,
recurrent weights of scale 0.1 (where 3 iterations converge; the residual column shows it), document
boundaries every ~512 tokens and a carried-in state. The loop's rows use --loop-reps calls (one call is
T steps of small kernels: seconds). The last column is the relative L2 difference of the Newton
output from the loop's. Each row is printed (flushed) as it is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ssd import cuda_ms, emit, machine  # noqa: E402

from undertow.kernels.pararnn import pararnn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--loop-reps", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write bench_pararnn_gpu.md here")
    args = parser.parse_args()
    for name in ("batch", "T", "hidden", "iterations", "reps", "loop_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not torch.cuda.is_available():
        print("bench_pararnn_gpu: no CUDA device", file=sys.stderr)
        return 1
    import triton

    torch.manual_seed(0)
    B, T, D, dev = args.batch, args.T, args.hidden, "cuda"
    rows: list[str] = []
    emit(rows, f"`python scripts/bench_pararnn_gpu.py {' '.join(sys.argv[1:])}` — {machine()}, torch "
               f"{torch.__version__}, triton {triton.__version__}\n",
         "| cell | shape | backend | forward ms | fwd+bwd ms | speed-up fwd | speed-up fwd+bwd | residual | vs loop |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|")
    doc_ids = (torch.rand(B, T, device=dev) < 1 / 512).cumsum(1)
    for cell in ("gru", "lstm"):
        leaves = {"u": torch.randn(B, T, 3, D, device=dev), "a": torch.randn(3, D, device=dev) * 0.1,
                  "p": torch.randn(2, D, device=dev) * 0.1 if cell == "lstm" else None}
        leaves = {k: None if v is None else v.requires_grad_() for k, v in leaves.items()}
        init = torch.randn(B, D, device=dev) * 0.5 if cell == "gru" else \
            (torch.randn(B, D, device=dev) * 0.5, torch.randn(B, D, device=dev) * 0.5)
        cot = torch.randn(B, T, D, device=dev)

        def call(backend, backward, **newton):
            with torch.set_grad_enabled(backward):
                y = pararnn(cell, leaves["u"], leaves["a"], leaves["p"], initial_state=init, doc_ids=doc_ids,
                            backend=backend, **newton)
                if backward:
                    (y * cot).sum().backward()
            return y

        shape = f"B={B} T={T} D={D}"
        loop = {bw: cuda_ms(lambda bw=bw: call("reference", bw), leaves, args.loop_reps) for bw in (False, True)}
        emit(rows, f"| {cell} | {shape} | reference (sequential loop) | {loop[False]:.1f} | {loop[True]:.1f} | 1.0x | "
                   "1.0x | 0 | 0 |")
        newton = dict(iterations=args.iterations)
        fast = {bw: cuda_ms(lambda bw=bw: call("triton", bw, **newton), leaves, args.reps) for bw in (False, True)}
        with torch.no_grad():
            y_loop = call("reference", False)
            y, _, residual = pararnn(cell, leaves["u"], leaves["a"], leaves["p"], initial_state=init, doc_ids=doc_ids,
                                     backend="triton", return_final_state=True, return_residual=True, **newton)
        diff = ((y - y_loop).norm() / y_loop.norm()).item()
        emit(rows, f"| {cell} | {shape} | triton (Newton, {args.iterations} it.) | {fast[False]:.2f} | "
                   f"{fast[True]:.2f} | {loop[False] / fast[False]:.0f}x | {loop[True] / fast[True]:.0f}x | "
                   f"{residual.item():.1e} | {diff:.1e} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_pararnn_gpu.md").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
