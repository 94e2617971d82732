"""CPU speed of the mLSTM's chunked form against its reference loop (forward), at T = 2048.

    python scripts/bench_mlstm_cpu.py [--T 2048] [--batch 2] [--heads 4] [--dqk 64] [--dv 128]
                                      [--chunk 64] [--trials 3] [--threads 1] [--backward]

Inputs in xLSTM-7B's ranges (input-gate pre-activations around its bias -10 mixed with open gates,
forget gates around its bias 3..6), packed rows with document boundaries (a pretraining batch),
and with `--initial-state` a carried-in state. The median of
`--trials` runs after one warm-up; one torch thread by default (as scripts/bench_kernels_cpu.py: the
reference loop's thousands of tiny ops slow down with two threads waiting on each other).
`--backward` also times forward + backward (the reference's takes minutes at T = 2048).
Prints a markdown table (with the command, machine and date) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import median_seconds, provenance  # noqa: E402

from undertow.kernels.mlstm import IMPLEMENTATIONS  # noqa: E402



def make_inputs(B: int, T: int, H: int, Dqk: int, Dv: int, carry: bool) -> dict:
    i = torch.where(torch.rand(B, T, H) < 0.5, -10.0, 2.0) + torch.randn(B, T, H)
    f = torch.linspace(3.0, 6.0, H) + torch.randn(B, T, H)
    return {
        "q": torch.randn(B, T, H, Dqk), "k": torch.randn(B, T, H, Dqk), "v": torch.randn(B, T, H, Dv), "i": i, "f": f,
        "doc_ids": (torch.rand(B, T) < 1 / 512).cumsum(1),
    } | ({"initial_state": (torch.randn(B, H, Dqk, Dv), torch.randn(B, H, Dqk), torch.randn(B, H))} if carry else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("T", 2048), ("batch", 2), ("heads", 4), ("dqk", 64), ("dv", 128), ("chunk", 64),
                          ("trials", 3), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--initial-state", action="store_true", help="carry a state in (as a CP rank or a continued row)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = make_inputs(args.batch, args.T, args.heads, args.dqk, args.dv, args.initial_state)
    rows = []
    for name in ("reference", "chunked"):
        fn = IMPLEMENTATIONS[name]
        kwargs = {"chunk_size": args.chunk} if name == "chunked" else {}

        def forward():
            with torch.no_grad():
                fn(**inputs, **kwargs)

        def forward_backward():
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in ("q", "k", "v", "i", "f")}
            h, (C, n, m) = fn(**{**inputs, **leaves}, **kwargs, return_final_state=True)
            (h.sum() + C.sum() + n.sum() + m.sum()).backward()

        fwd = median_seconds(forward, args.trials)
        bwd = median_seconds(forward_backward, 1 if name == "reference" else args.trials) if args.backward else None
        rows.append((name, fwd, bwd))
    ref_fwd = rows[0][1]
    shape = f"B={args.batch} T={args.T} H={args.heads} Dqk={args.dqk} Dv={args.dv} chunk={args.chunk}"
    print(provenance(args.threads))
    print("| op | shape | backend | forward (ms) | speedup | forward+backward (ms) |")
    print("|---|---|---|---|---|---|")
    for name, fwd, bwd in rows:
        fb = f"{bwd * 1e3:.1f}" if bwd is not None else "-"
        print(f"| mlstm | {shape} | {name} | {fwd * 1e3:.1f} | {ref_fwd / fwd:.1f}x | {fb} |")


if __name__ == "__main__":
    main()
