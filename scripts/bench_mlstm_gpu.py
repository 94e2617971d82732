"""Speed of our Triton mLSTM beside mlstm_kernels' TFLA (`mlstm_chunkwise__xl_chunk`) on one GPU.
Prints a markdown table with the command, machine and date. Rows: our chunkwise form (triton_chunk.py,
the default "triton" backend), TFLA, then our fused recurrent form (triton.py) for comparison.

    python scripts/bench_mlstm_gpu.py [--batch 8] [--T 2048] [--heads 16] [--dqk 128] [--dv 128]
                                      [--chunk 64] [--tfla-chunk 128] [--reps 10] [--out DIR]

Forward and forward+backward ms of each kernel on fresh random bf16 q, k, v and float32 gate
pre-activations (forget bias +3, as the anchors' bench), each in its own layout (ours (B, T, H, D),
TFLA's (B, H, T, D)); CUDA events around each call, the L2 cache flushed before it, median over --reps
calls after warm-up (bench_ssd.cuda_ms). The gradients differ by design: ours equal autograd of the
recurrence, TFLA's treat n and m as constants. The forward is the same function: the table gives the
relative L2 difference of our h from TFLA's. mlstm_kernels must be importable (scripts/gpu_check.sh puts
the anchor wheels on PYTHONPATH); without it only our rows are printed. Each row is printed (flushed) as
it is measured, so a time limit that kills the run keeps the rows before it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ssd import cuda_ms, emit, leaves_of, machine  # noqa: E402

from undertow.kernels.mlstm import IMPLEMENTATIONS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dqk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64,
                        help="ours: the chunkwise form's chunk (the recurrent form's checkpoint interval)")
    parser.add_argument("--no-recurrent", action="store_true", help="skip the fused recurrent form's row")
    parser.add_argument("--tfla-chunk", type=int, default=128, help="TFLA's chunk (the anchors' bench uses 128)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write bench_mlstm_gpu.md and bench_mlstm.json here")
    args = parser.parse_args(argv)
    for name in ("batch", "T", "heads", "dqk", "dv", "chunk", "tfla_chunk", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def header() -> str:
    import triton

    return (f"`python scripts/bench_mlstm_gpu.py {' '.join(sys.argv[1:])}` — {machine()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def import_tfla():
    """mlstm_kernels' TFLA entry point, or None when the package is not importable."""
    try:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk
    except ImportError as error:
        print(f"mlstm_kernels not importable ({error}): our rows only", flush=True)
        return None
    return mlstm_chunkwise__xl_chunk


def make_inputs(B: int, T: int, H: int, Dqk: int, Dv: int, device, seed: int = 0) -> dict:
    """Fresh random inputs in our layout: q, k (B, T, H, Dqk), v (B, T, H, Dv) bf16; i, f (B, T, H) float32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    return {"q": rnd(B, T, H, Dqk).bfloat16(), "k": rnd(B, T, H, Dqk).bfloat16(), "v": rnd(B, T, H, Dv).bfloat16(),
            "i": rnd(B, T, H), "f": rnd(B, T, H) + 3.0}


def kernels(args, tfla) -> dict:
    """name -> (fn(inputs) -> h, whether fn takes TFLA's heads-first layout). The inputs are transposed
    once per kernel (`heads_first`), outside the timed calls, so only the kernels are timed."""
    from undertow.kernels.mlstm.triton import mlstm_triton
    from undertow.kernels.mlstm.triton_chunk import mlstm_triton_chunk

    def call(fn):
        return lambda x: fn(x["q"], x["k"], x["v"], x["i"], x["f"], chunk_size=args.chunk)

    found = {OURS: (call(mlstm_triton_chunk), False)}
    if tfla is not None:
        found[TFLA] = (lambda x: tfla(x["q"], x["k"], x["v"], x["i"], x["f"], chunk_size=args.tfla_chunk), True)
    if not args.no_recurrent:
        found["undertow triton fused recurrent (exact grads)"] = (call(mlstm_triton), False)
    return found


OURS, TFLA = "undertow triton chunkwise (exact grads)", "mlstm_kernels TFLA xl_chunk"


def heads_first(inputs: dict) -> dict:
    return {name: x.transpose(1, 2).contiguous() for name, x in inputs.items()}


def run(args) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False
    tfla = import_tfla()
    B, T, H, Dqk, Dv = args.batch, args.T, args.heads, args.dqk, args.dv
    rows: list[str] = []
    emit(rows, header(), "", f"B={B}, T={T}, {H} heads, Dqk={Dqk}, Dv={Dv}, bf16 q/k/v, float32 gates; ours "
         f"chunk {args.chunk}, TFLA chunk {args.tfla_chunk}; median of {args.reps} calls, L2 flushed",
         "", "| kernel | forward ms | forward+backward ms | rel. L2 diff of h from TFLA's |", "|---|---:|---:|---:|")
    inputs = make_inputs(B, T, H, Dqk, Dv, "cuda")
    dh = torch.randn(B, T, H, Dv, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).bfloat16()
    results, outputs = [], {}
    for name, (fn, transposed) in kernels(args, tfla).items():  # a failing kernel is reported, the run goes on
        x, grad = (heads_first(inputs), dh.transpose(1, 2).contiguous()) if transposed else (inputs, dh)
        try:
            with torch.no_grad():
                h = fn(x).float()
            outputs[name] = h.transpose(1, 2) if transposed else h
            leaves = leaves_of(x)
            fwd = cuda_ms(lambda: fn(leaves), leaves, args.reps)
            fwd_bwd = cuda_ms(lambda: fn(leaves).backward(grad), leaves, args.reps)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            emit(rows, f"| {name} | FAILED: {type(error).__name__}: {str(error)[:120]} | | |")
            continue
        diff = ""
        mine = outputs.get(OURS) if name == TFLA else outputs[name]  # TFLA's row: our chunkwise h against it
        if TFLA in outputs and mine is not None:
            diff = f"{((mine - outputs[TFLA]).norm() / outputs[TFLA].norm()).item():.2e}"
        results.append({"kernel": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "rel_diff_h": diff})
        emit(rows, f"| {name} | {fwd:.3f} | {fwd_bwd:.3f} | {diff} |")
    by_name = {r["kernel"]: r for r in results}
    if OURS in by_name and TFLA in by_name:
        ours, theirs = by_name[OURS], by_name[TFLA]
        emit(rows, f"\nundertow / TFLA = {ours['fwd_ms'] / theirs['fwd_ms']:.2f} forward, "
                   f"{ours['fwd_bwd_ms'] / theirs['fwd_bwd_ms']:.2f} forward+backward (target <= 1.0)")
    if args.out:
        Path(args.out, "bench_mlstm.json").write_text(json.dumps(
            {"machine": machine(), "shape": [B, T, H, Dqk, Dv], "results": results}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_mlstm_gpu.py: no CUDA device")
    if "triton" not in IMPLEMENTATIONS:
        sys.exit("bench_mlstm_gpu.py: triton is not installed, undertow's mLSTM has no Triton form here")
    rows = run(args)
    if args.out:
        Path(args.out, "bench_mlstm_gpu.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
