"""GPU speed of the MoE layer against a dense SwiGLU of the same active FLOPs (issue 18's target:
MoE forward + backward within 1.3x of the dense one), and of its grouped GEMMs.

    python scripts/bench_moe_gpu.py [--tokens 8192] [--d 2048] [--hidden 1024] [--experts 64]
                                    [--top-k 8] [--reps 20] [--out DIR] [--device cuda]

Default shape: one OLMoE-1B-7B MLP (64 experts of width 1024, top-8) on 8192 tokens; the dense
SwiGLU has width top_k * hidden (8192), so both run the same matmul FLOPs per token. bf16 autocast
over float32 weights, as the trainer runs. Rows: the MoE layer with the grouped GEMM the dispatch
picks (torch._grouped_mm where it runs), with the Triton grouped GEMM (kernels/moe/triton_grouped.py,
CUDA only), with the split GEMM (one matmul per expert), and the dense SwiGLU; the median of `--reps`
CUDA-event timings after warm-up (the Triton kernels compile in the warm-up). Writes bench_moe_gpu.md
to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
from unittest import mock

import torch

import undertow.kernels.moe.grouped as grouped
from undertow.kernels.moe import choose_gemm
from undertow.models.common.mlp import SwiGLU
from undertow.models.moe.config import MoEConfig
from undertow.models.moe.layer import MoELayer


def time_ms(step, reps: int, device: str) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("tokens", 8192), ("d", 2048), ("hidden", 1024), ("experts", 64), ("top-k", 8),
                          ("reps", 20)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device, N, d, h, E, k = args.device, args.tokens, args.d, args.hidden, args.experts, args.top_k
    torch.manual_seed(0)
    moe = MoELayer(d, h, MoEConfig(n_experts=E, top_k=k, expert_hidden=h)).to(device)
    moe.init_weights(0.02, 0.02)
    dense = SwiGLU(d, k * h).to(device)
    dense.init_weights(0.02, 0.02)
    x = torch.randn(N, d, device=device)
    gemm = choose_gemm(x.to(torch.bfloat16), moe.w_gate, moe.w_down)

    def run(module, **kwargs):
        def step():
            leaf = x.clone().requires_grad_()
            with torch.autocast(device, dtype=torch.bfloat16):
                out = module(leaf)
                out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
        return step

    rows = [("dense SwiGLU (width top_k x hidden)", time_ms(run(dense), args.reps, device))]
    for name in dict.fromkeys((gemm, "triton", "split") if device == "cuda" else (gemm, "split")):  # each GEMM
        with mock.patch.object(grouped, "choose_gemm", return_value=name):
            rows.append((f"MoE layer, {name} GEMM", time_ms(run(moe), args.reps, device)))
    flops = 6 * N * 3 * d * k * h
    lines = [f"MoE {N} tokens x d {d}, {E} experts of {h}, top-{k} vs dense SwiGLU {k * h}; bf16 autocast; "
             f"{torch.cuda.get_device_name() if device == 'cuda' else device}, torch {torch.__version__}", "",
             "| layer | forward+backward (ms) | / dense | TFLOP/s (matmuls) |", "|---|---:|---:|---:|"]
    for name, ms in rows:
        lines.append(f"| {name} | {ms:.2f} | {ms / rows[0][1]:.2f}x | {flops / ms / 1e9:.0f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(args.out, "bench_moe_gpu.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
