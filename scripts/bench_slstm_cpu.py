"""CPU speed of sLSTM's CPU form (native loop, forward and hand-written backward) against the
PyTorch per-step loop (the reference, under autograd).

    python scripts/bench_slstm_cpu.py [--T 2048] [--batch 2] [--heads 4] [--head-dim 64] [--threads 1]

Median of `--trials` runs after a warm-up (bench_kernels_cpu.py's timing), with document
boundaries and a carried-in state. Prints a markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels_cpu import _median_seconds  # noqa: E402

from undertow.kernels.slstm import IMPLEMENTATIONS  # noqa: E402
from undertow.kernels.slstm import native as slstm_native  # noqa: E402


def fwd_and_fwd_bwd(fn, gates, R, init, doc_ids, trials: int) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            fn(gates, R, initial_state=init, doc_ids=doc_ids)

    def forward_backward():
        g, r = gates.clone().requires_grad_(), R.clone().requires_grad_()
        y, final = fn(g, r, initial_state=init, doc_ids=doc_ids, return_final_state=True)
        (y.sum() + final[1].sum()).backward()

    return _median_seconds(forward, trials), _median_seconds(forward_backward, trials)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, T, H, D = args.batch, args.T, args.heads, args.head_dim
    gates = torch.randn(B, T, 4, H, D)
    gates[:, :, 1] += 2.0
    R = torch.randn(4, H, D, D) / D**0.5
    init = (torch.randn(B, H, D), torch.randn(B, H, D), torch.rand(B, H, D) + 0.5, torch.randn(B, H, D))
    doc_ids = (torch.rand(B, T) < 1 / 512).cumsum(1)
    print(f"`python {' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, {args.threads} torch "
          f"threads, torch {torch.__version__}, {datetime.date.today().isoformat()}, load average "
          f"{os.getloadavg()[0]:.1f} at the start\n")
    print("| op | shape | backend | forward ms | speed-up | fwd+bwd ms | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|", flush=True)
    shape = f"B={B} T={T} H={H} Dh={D}"
    ref = fwd_and_fwd_bwd(IMPLEMENTATIONS["reference"], gates, R, init, doc_ids, args.trials)
    rows = [("reference (PyTorch per-step loop)", ref)]
    if slstm_native._library() is not None:
        rows.append(("chunked (native loop)", fwd_and_fwd_bwd(IMPLEMENTATIONS["chunked"], gates, R, init, doc_ids,
                                                             args.trials)))
    for name, (fwd, fb) in rows:
        print(f"| slstm | {shape} | {name} | {fwd * 1e3:.1f} | {ref[0] / fwd:.1f}x | {fb * 1e3:.1f} | {ref[1] / fb:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
