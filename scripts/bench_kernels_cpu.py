"""CPU speed of the chunked kernel forms against their reference loops, at T = 2048.

    python scripts/bench_kernels_cpu.py [--T 2048] [--batch 2] [--trials 3] [--threads 1]

For causal_conv1d (D channels, K = 4) and selective_scan (Dc channels, N states), each with
document boundaries and a carried-in state, times the forward and the forward + backward of
the reference and chunked backends (selective_scan's chunked forward both as its native CPU
loop, the default where a C++ compiler is, and as its PyTorch loop); the median of `--trials` runs is reported, after one
warm-up. One torch thread by default: on a busy machine, the reference loops' thousands of tiny
ops slow down several-fold with two threads waiting on each other. Prints a markdown table (with the command, machine and date) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import median_seconds  # noqa: E402

from undertow.kernels.causal_conv1d import IMPLEMENTATIONS as CONV  # noqa: E402
from undertow.kernels.selective_scan import IMPLEMENTATIONS as SCAN  # noqa: E402
from undertow.kernels.selective_scan import native as scan_native  # noqa: E402


def _median_seconds(step, trials: int) -> float:
    """Median of `trials` timed runs after a warm-up; a warm-up over 2 s is taken as the time
    (the reference loops' backward takes a minute at T = 2048, dominated by steady-state work)."""
    return median_seconds(step, trials, long_warm_up=2.0)


def _fwd_and_fwd_bwd(fn, inputs: dict, trials: int) -> tuple[float, float]:
    """Median seconds of fn(**inputs) under no_grad, and of forward + backward of its sum."""
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) if v is not None else None for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            fn(**inputs)

    def forward_backward():
        y, h = fn(**leaves, return_final_state=True)
        (y.sum() + h.sum()).backward()

    return _median_seconds(forward, trials), _median_seconds(forward_backward, trials)


def _doc_ids(batch: int, T: int) -> torch.Tensor:
    return (torch.rand(batch, T) < 1 / 512).cumsum(1)


def bench_causal_conv1d(T: int, batch: int, trials: int, D: int = 512, K: int = 4) -> list[tuple]:
    inputs = {
        "x": torch.randn(batch, T, D), "weight": torch.randn(D, K), "bias": torch.randn(D),
        "initial_state": torch.randn(batch, D, K - 1), "doc_ids": _doc_ids(batch, T),
    }
    shape = f"B={batch} T={T} D={D} K={K}"
    return [("causal_conv1d", shape, name, *_fwd_and_fwd_bwd(CONV[name], inputs, trials)) for name in ("reference", "chunked")]


def bench_selective_scan(T: int, batch: int, trials: int, Dc: int = 256, N: int = 16) -> list[tuple]:
    """Mamba's initialization: A = -[1..N] per channel, dt = softplus(delta + bias) near a
    log-uniform draw from [1e-3, 1e-1]."""
    dt0 = torch.exp(torch.empty(Dc).uniform_(math.log(1e-3), math.log(1e-1)))
    inputs = {
        "u": torch.randn(batch, T, Dc), "delta": 0.5 * torch.randn(batch, T, Dc),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(Dc, 1),
        "B": torch.randn(batch, T, N), "C": torch.randn(batch, T, N), "D": torch.randn(Dc),
        "z": torch.randn(batch, T, Dc), "delta_bias": dt0 + torch.log(-torch.expm1(-dt0)),
        "initial_state": torch.randn(batch, Dc, N), "doc_ids": _doc_ids(batch, T),
    }
    shape = f"Bt={batch} T={T} Dc={Dc} N={N}"
    rows = [("selective_scan", shape, name, *_fwd_and_fwd_bwd(SCAN[name], inputs, trials)) for name in ("reference", "chunked")]
    if scan_native._library() is not None:  # the chunked form's forward as a native loop (the default here)
        rows[-1] = ("selective_scan", shape, "chunked (native loop)", *rows[-1][3:])
        scan_native.ENABLED = False
        try:
            rows.append(("selective_scan", shape, "chunked (PyTorch loop)", *_fwd_and_fwd_bwd(SCAN["chunked"], inputs, trials)))
        finally:
            scan_native.ENABLED = True
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--batch", type=int, default=2, help="rows (default 2)")
    parser.add_argument("--trials", type=int, default=3, help="timed runs per case; the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    print(f"`python {' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, "
          f"{args.threads} torch threads, torch {torch.__version__}, {datetime.date.today().isoformat()}, "
          f"load average {os.getloadavg()[0]:.1f} at the start\n")
    print("| op | shape | backend | forward ms | speed-up | fwd+bwd ms | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|", flush=True)
    for bench in (bench_causal_conv1d, bench_selective_scan):
        (op, shape, _, ref_fwd, ref_fb), *rows = bench(args.T, args.batch, args.trials)
        for name, fwd, fb in [("reference", ref_fwd, ref_fb)] + [row[2:] for row in rows]:
            print(f"| {op} | {shape} | {name} | {fwd * 1e3:.1f} | {ref_fwd / fwd:.1f}x | {fb * 1e3:.1f} | "
                  f"{ref_fb / fb:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
