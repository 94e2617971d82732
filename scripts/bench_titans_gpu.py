"""Speed of our Triton Titans linear memory beside fla's gated delta rule (`chunk_gated_delta_rule`) on one
GPU, at the same shape (issue 19's GPU line). Prints a markdown table with the command, machine and date.

    python scripts/bench_titans_gpu.py [--batch 8] [--T 2048] [--heads 16] [--dim 128] [--chunk 64]
                                       [--reps 10] [--no-fp32] [--no-chunked] [--out DIR]
    python scripts/bench_titans_gpu.py --dry-run     # CPU: Triton's interpreter at a tiny shape, no timing

Rows (forward ms, forward+backward ms, relative L2 difference of y from our Triton form's on the float32
inputs with exact products, computed once before the rows), the most wanted first:
  undertow triton, bf16 q/k/v      the "triton" backend (triton_linear.py): tf32 products, float32 states
  fla chunk_gated_delta_rule       bf16, qk l2-normalised in the kernel (the anchors' setting); fla refuses
                                   its backward on Hopper with some Triton versions: the row says so
  undertow triton, float32         the same kernels with exact float32 products (the tests' setting)
  undertow chunked (PyTorch)       the chunked form, float32 (what the model runs without Triton)
The math differs: the delta rule writes with its gradient at the previous token's state, Titans at the
chunk start plus momentum; both are one Dk x Dv state per head with a chunk-sequential level, which is
what is compared. Inputs: fresh random q, k (l2-normalised), v, theta = 0.1 sigmoid, eta, alpha sigmoid
gates (eta ~ 0.9, alpha ~ 0.02), M_0 a float32 parameter; fla: log-decay logsigmoid(x + 3), beta sigmoid.
Timing: CUDA events, L2 flushed before each call, median over --reps after warm-up (bench_ssd.cuda_ms);
the forward is the training forward (inputs require grad). Each row is printed (flushed) as it is
measured, so a time limit that kills the run keeps the rows before it. fla must be importable
(scripts/gpu_check.sh puts the anchor wheels on PYTHONPATH); without it only our rows are printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before any Triton kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ssd import cuda_ms, emit, leaves_of, machine  # noqa: E402

from undertow.kernels.titans_memory.chunked import titans_memory_chunked  # noqa: E402

OURS_BF16, OURS_F32 = "undertow triton, bf16 q/k/v", "undertow triton, float32"
CHUNKED, FLA = "undertow chunked (PyTorch), float32", "fla chunk_gated_delta_rule, bf16"
DRY_SHAPE = dict(batch=1, T=24, heads=2, dim=16, chunk=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128, help="Dk = Dv of a head (fla's K = V)")
    parser.add_argument("--chunk", type=int, default=64, help="our chunk (fla's is fixed at 64)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-fp32", action="store_true", help="skip our exact float32 row")
    parser.add_argument("--no-chunked", action="store_true", help="skip the PyTorch chunked form's row")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"CPU, Triton's interpreter, {DRY_SHAPE}: each row run once, no timing")
    parser.add_argument("--out", default=None, help="also write bench_titans_gpu.md and bench_titans.json here")
    args = parser.parse_args(argv)
    for name in ("batch", "T", "heads", "dim", "chunk", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dry_run:
        vars(args).update(DRY_SHAPE)
    return args


def header() -> str:
    import triton

    return (f"`python scripts/bench_titans_gpu.py {' '.join(sys.argv[1:])}` — {machine()}, "
            f"torch {torch.__version__}, triton {triton.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def import_fla():
    """fla's chunk_gated_delta_rule, or None when fla is not importable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as error:  # noqa: BLE001  (ImportError, or a missing dependency such as einops)
        print(f"fla not importable ({type(error).__name__}: {error}): our rows only", flush=True)
        return None
    return chunk_gated_delta_rule


def make_inputs(B: int, T: int, H: int, D: int, device, seed: int = 0) -> dict:
    """Ours: q, k (B, T, H, D) l2-normalised, v (B, T, H, D) float32 (cast per row); theta, eta, alpha
    (B, T, H); M0 (H, D, D). fla's: its log-decay g (B, T, H) float32 and beta (B, T, H)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    return {"q": F.normalize(rnd(B, T, H, D), dim=-1), "k": F.normalize(rnd(B, T, H, D), dim=-1), "v": rnd(B, T, H, D),
            "theta": 0.1 * torch.sigmoid(rnd(B, T, H)), "eta": torch.sigmoid(rnd(B, T, H) + 2.0),
            "alpha": torch.sigmoid(rnd(B, T, H) - 4.0), "M0": rnd(H, D, D) * D ** -0.5,
            "g": F.logsigmoid(rnd(B, T, H) + 3.0), "beta": torch.sigmoid(rnd(B, T, H))}


def kernels(args, fla) -> dict:
    """name -> (fn(inputs) -> y, the dtype of q/k/v (and fla's beta) for that row)."""
    from undertow.kernels.titans_memory.triton_linear import titans_memory_triton

    def ours(fn, **extra):
        return lambda x: fn(x["q"], x["k"], x["v"], x["theta"], x["eta"], x["alpha"], (x["M0"],),
                            chunk_size=args.chunk, **extra)

    found = {OURS_BF16: (ours(titans_memory_triton), torch.bfloat16)}  # the most wanted rows first
    if fla is not None and not args.dry_run:
        found[FLA] = (lambda x: fla(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True)[0],
                      torch.bfloat16)
    if not args.no_fp32:
        found[OURS_F32] = (ours(titans_memory_triton), torch.float32)
    if not args.no_chunked:
        found[CHUNKED] = (ours(titans_memory_chunked), torch.float32)
    return found


def exact_output(args, inputs: dict):
    """y of our Triton form on the float32 inputs (exact products), the diff column's base; None if it fails."""
    from undertow.kernels.titans_memory.triton_linear import titans_memory_triton

    x = cast(inputs, torch.float32)
    try:
        with torch.no_grad():
            return titans_memory_triton(x["q"], x["k"], x["v"], x["theta"], x["eta"], x["alpha"], (x["M0"],),
                                        chunk_size=args.chunk).float()
    except Exception:  # noqa: BLE001  (the float32 row then reports the failure)
        traceback.print_exc()
        return None


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {n: x.to(dtype) if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()}


def measure(fn, x: dict, dy: torch.Tensor, reps: int, dry: bool) -> tuple[torch.Tensor, float, float]:
    """(y float32, forward ms, forward+backward ms); in a dry run one wall-clock call of each (meaningless)."""
    with torch.no_grad():
        y = fn(x).float()
    leaves = leaves_of(x)
    if dry:
        start = time.perf_counter()
        fn(leaves)
        fwd = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        fn(leaves).backward(dy.to(y.device))
        return y, fwd, 1e3 * (time.perf_counter() - start)
    return y, cuda_ms(lambda: fn(leaves), leaves, reps), cuda_ms(lambda: fn(leaves).backward(dy), leaves, reps)


def run(args) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cpu" if args.dry_run else "cuda"
    fla = import_fla()
    B, T, H, D = args.batch, args.T, args.heads, args.dim
    rows: list[str] = []
    note = " — DRY RUN: CPU, Triton's interpreter, one call each, times meaningless" if args.dry_run else ""
    emit(rows, header() + note, "", f"B={B}, T={T}, {H} heads, Dk=Dv={D}; ours chunk {args.chunk}, linear memory, "
         f"Titans rule (l2, momentum, decay), no documents; median of {args.reps} calls, L2 flushed", "",
         "| kernel | forward ms | forward+backward ms | rel. L2 diff of y from ours float32 |", "|---|---:|---:|---:|")
    inputs = make_inputs(B, T, H, D, device)
    dy = torch.randn(B, T, H, D, device=device, generator=torch.Generator(device).manual_seed(1))
    results, exact = [], exact_output(args, inputs)
    for name, (fn, dtype) in kernels(args, fla).items():  # a failing kernel is reported, the run goes on
        x = cast(inputs, dtype)
        try:
            y, fwd, fwd_bwd = measure(fn, x, dy.to(dtype), args.reps, args.dry_run)
        except Exception as error:  # noqa: BLE001  (fla refuses its backward on some Hopper/Triton pairs)
            traceback.print_exc()
            emit(rows, f"| {name} | FAILED: {type(error).__name__}: {str(error)[:120]} | | |")
            continue
        diff = "" if exact is None or name == FLA else f"{((y - exact).norm() / exact.norm()).item():.2e}"
        results.append({"kernel": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "rel_diff_y": diff})
        emit(rows, f"| {name} | {fwd:.3f} | {fwd_bwd:.3f} | {diff} |")
    by_name = {r["kernel"]: r for r in results}
    if OURS_BF16 in by_name and FLA in by_name:
        ours, theirs = by_name[OURS_BF16], by_name[FLA]
        emit(rows, f"\nundertow triton bf16 / fla gated delta rule = {ours['fwd_ms'] / theirs['fwd_ms']:.2f} forward, "
                   f"{ours['fwd_bwd_ms'] / theirs['fwd_bwd_ms']:.2f} forward+backward")
    if args.out:
        Path(args.out, "bench_titans.json").write_text(json.dumps(
            {"machine": machine(), "shape": [B, T, H, D], "chunk": args.chunk, "dry_run": args.dry_run,
             "results": results}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_titans_gpu.py: no CUDA device (--dry-run runs the rows in Triton's interpreter on CPU)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_titans_gpu.py: triton is not installed, undertow's Titans memory has no Triton form here")
    rows = run(args)
    if args.out:
        Path(args.out, "bench_titans_gpu.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
