"""Tokens/s and MFU of a training step of a recipe's model on one GPU, on random tokens.

    python scripts/bench_train_gpu.py [RECIPE] [--batch 8] [--seq-len 2048] [--steps 20] [--warmup 5]
                                      [--compile] [--docs N] [--out DIR] [--section.field VALUE ...]

Builds the recipe's model (default mamba2-370m) on the meta device, materializes it on CUDA with
fp32 parameters and bf16 autocast (as the trainer does), and times full steps (forward, backward,
gradient clipping, fused AdamW), synchronized, by the host clock: median over --steps after --warmup untimed steps
(the first of which compiles the Triton kernels). The data loader is left out on purpose: this
measures the model and its kernels. With --docs N every row holds N packed documents (doc_ids), so
the kernels' document resets are exercised too. MFU = tokens/s x the family's FLOPs/token / peak,
given against two peaks: the datasheet's dense bf16 rate and a bf16 8192^3 matmul measured in the
same run. Prints one markdown table row; --out also writes bench_train_gpu.json there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from undertow.cli import split_overrides
from undertow.models import registry
from undertow.models.common.loss import lm_loss_sum
from undertow.parallel.wrap import apply_compile
from undertow.pretrain.config import load_config
from undertow.pretrain.metrics import detect_peak_tflops
from undertow.pretrain.optim import build_optimizer


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="mamba2-370m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--docs", type=int, default=4, help="packed documents per row (0: no doc_ids)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (training.compile)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no autocast, no MFU)")
    plain, overrides = split_overrides(sys.argv[1:])
    args = parser.parse_args(plain)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train_gpu.py: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cfg = load_config(args.recipe, overrides)
    spec = registry.get(cfg.family)
    with torch.device("meta"):
        model = spec.model_cls(cfg.model)
    model.to_empty(device=device)
    model.init_weights()
    if args.compile:
        apply_compile(model)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    optimizer = build_optimizer(model, cfg.optimizer, device)

    B, T, V = args.batch, args.seq_len, cfg.model.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    extra = {}
    if args.docs > 0:
        extra["doc_ids"] = (torch.arange(T, device=device) * args.docs // T).expand(B, T).contiguous()

    def step():
        ids = torch.randint(0, V, (B, T + 1), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(ids[:, :-1], **extra)
        loss = lm_loss_sum(logits, ids[:, 1:]) / (B * T)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        loss = step()
    sync()
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    times = []
    for _ in range(args.steps):  # host clock around a synchronized step: the whole step, launch gaps included
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tps = B * T / seconds
    fpt = spec.flops_per_token(cfg.model, T)
    datasheet = detect_peak_tflops(device)
    measured = matmul_tflops() if on_gpu else float("nan")
    result = {
        "recipe": args.recipe, "overrides": overrides, "params": n_params, "batch": B, "seq_len": T, "docs": args.docs,
        "compile": args.compile, "step_s": seconds, "tokens_per_s": tps, "flops_per_token": fpt,
        "tflops": tps * fpt / 1e12, "peak_datasheet_tflops": datasheet, "peak_matmul_tflops": measured,
        "mfu_datasheet": tps * fpt / 1e12 / datasheet if datasheet else None, "mfu_matmul": tps * fpt / 1e12 / measured,
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__, "date": str(datetime.date.today()),
    }
    mfu_d = f"{result['mfu_datasheet']:.1%}" if datasheet else "n/a"
    print("| recipe | params | B x T | compile | step ms | tokens/s | TFLOP/s | MFU (datasheet) | MFU (matmul) | "
          "peak mem | device |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {args.recipe} {' '.join(overrides)} | {n_params / 1e6:.0f}M | {B} x {T} | {args.compile} | "
          f"{seconds * 1e3:.1f} | {tps:,.0f} | {result['tflops']:.0f} | {mfu_d} | {result['mfu_matmul']:.1%} | "
          f"{result['max_mem_gib']:.1f} GiB | {result['device']}, torch {torch.__version__} |")
    if args.out:
        name = "bench_train_gpu_compiled.json" if args.compile else "bench_train_gpu.json"
        Path(args.out, name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
