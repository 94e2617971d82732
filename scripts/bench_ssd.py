"""Speed of the SSD (Mamba-2) kernel forms. Prints a markdown table with the command, machine and date.

    python scripts/bench_ssd.py cpu [--T 2048] [--batch 1] [--heads 8] [--trials 3] [--threads 2]
        chunked against the reference loop on CPU, forward and forward + backward (median of
        --trials runs after one warm-up), with document boundaries and a carried-in state.
    python scripts/bench_ssd.py gpu [--out DIR] [--reps 50]
        Triton SSD beside mamba_ssm's mamba_chunk_scan_combined in the same run, at B=8,T=2048 and
        B=2,T=8192, 32 heads x 64, d_state 128, chunk 256, bf16: CUDA events around each call, the L2
        cache flushed before it, median over --reps calls after warm-up. mamba_ssm must be importable
        (scripts/gpu_check.sh installs the anchor wheels); without it only our rows are printed. Each row
        is printed (flushed) as soon as it is measured.
    python scripts/bench_ssd.py gpu --profile [--out DIR] [--reps 10]
        Where our forward+backward (B=8, T=2048, as above) spends its time: each kernel's device time
        per call (torch.profiler), the wall time per call and the host time to issue one.
    python scripts/bench_ssd.py gpu --sweep [--only "NAME;NAME"] [--out DIR] [--reps 20]
        Our Triton SSD at B=8,T=2048 under each setting of SWEEP (UNDERTOW_SSD_DOT / _TILES / _BWD,
        see undertow/kernels/ssd/triton.py): forward and forward+backward ms, and the relative error
        of y and of every gradient against the exact float32 chunked PyTorch form (tf32 off; no Triton
        float32 compile, which takes minutes at these tiles) on float32 copies of the same
        inputs (tolerance for bf16: 1e-2). A setting that fails to compile is reported and skipped;
        --only runs the named settings alone.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

from undertow.kernels.ssd import IMPLEMENTATIONS


def make_inputs(Bt, T, H, P, N, dtype, device, *, seed=0, doc_every=0, init=False):
    """Fresh random Mamba-2-like inputs (G = 1): A in [-16, -1], dt_bias = softplus^-1 of dt in
    [1e-3, 1e-1]; document starts every `doc_every` tokens if > 0."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale

    dt0 = torch.exp(torch.rand(H, generator=gen, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "x": rnd(Bt, T, H, P).to(dtype), "dt": rnd(Bt, T, H, scale=0.5).to(dtype),
        "A": -(torch.rand(H, generator=gen, device=device) * 15 + 1),
        "B": rnd(Bt, T, 1, N).to(dtype), "C": rnd(Bt, T, 1, N).to(dtype),
        "D": rnd(H), "dt_bias": dt0 + torch.log(-torch.expm1(-dt0)),
        "initial_state": rnd(Bt, H, P, N) if init else None,
    }
    if doc_every:
        inputs["doc_ids"] = (torch.arange(T, device=device) // doc_every).expand(Bt, T).contiguous()
    return inputs


def leaves_of(inputs: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(v.is_floating_point()) if v is not None else None
            for k, v in inputs.items()}


def machine() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def header(args) -> str:
    import triton

    return (f"`python scripts/bench_ssd.py {' '.join(sys.argv[1:])}` — {machine()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


# ------------------------------------------------------------------------------------------------ CPU
def emit(rows: list[str], *lines: str) -> None:
    """Append lines to the table and print them at once: a time limit that kills the run still
    leaves every row measured so far on the output."""
    rows.extend(lines)
    print("\n".join(lines), flush=True)


def cpu_seconds(fn, inputs, backward: bool, trials: int, chunk: int) -> float:
    kwargs = {} if fn is IMPLEMENTATIONS["reference"] else {"chunk_size": chunk}

    def step():
        leaves = leaves_of(inputs)
        if not backward:
            with torch.no_grad():
                fn(**leaves, **kwargs)
            return
        y, final = fn(**leaves, **kwargs, return_final_state=True)
        (y.float().sum() + final.sum()).backward()

    step()
    seconds = []
    for _ in range(trials):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_cpu(args) -> list[str]:
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.T, args.heads, args.headdim, args.dstate, torch.float32, "cpu",
                         doc_every=500, init=True)
    setting = (f"B={args.batch}, T={args.T}, {args.heads} heads x {args.headdim}, d_state {args.dstate}, chunk "
               f"{args.chunk}, float32, document starts every 500 tokens, carried-in state; median of {args.trials}.")
    rows = []
    emit(rows, header(args), "", setting, "", "| pass | reference ms | chunked ms | speed-up |", "|---|---:|---:|---:|")
    for name, backward in (("forward", False), ("forward+backward", True)):
        ref = cpu_seconds(IMPLEMENTATIONS["reference"], inputs, backward, args.trials, args.chunk)
        fast = cpu_seconds(IMPLEMENTATIONS["chunked"], inputs, backward, args.trials, args.chunk)
        emit(rows, f"| {name} | {ref * 1e3:,.1f} | {fast * 1e3:,.1f} | {ref / fast:.1f}x |")
    return rows


# ------------------------------------------------------------------------------------------------ GPU
def import_mamba_chunk_scan():
    """mamba_ssm's SSD Triton entry point, or None. Its package __init__ imports the CUDA extension
    (absent from a pure-Python wheel), so the package is registered bare and only the Triton
    submodule is imported."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return None
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["mamba_ssm"] = package
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def cuda_ms(call, leaves: dict, reps: int) -> float:
    """Median ms of call() by CUDA events, grads reset and L2 flushed (outside the events) before each."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):  # compile, autotune, warm
        call()
    times = []
    for _ in range(reps):
        for v in leaves.values():
            if v is not None:
                v.grad = None
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(fn, inputs: dict, dy: torch.Tensor, reps: int):
    """(y as float32, forward ms, forward+backward ms) of fn(leaves) -> y."""
    with torch.no_grad():
        y = fn(inputs).float()
    leaves = leaves_of(inputs)
    fwd = cuda_ms(lambda: fn(leaves), leaves, reps)
    fwd_bwd = cuda_ms(lambda: fn(leaves).backward(dy), leaves, reps)
    return y, fwd, fwd_bwd


def run_gpu(args) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False
    mamba = import_mamba_chunk_scan()
    H, P, N, chunk = 32, 64, 128, 256
    rows = []
    emit(rows, header(args), "", f"{H} heads x {P}, d_state {N}, chunk {chunk}, G=1, bf16 x/dt/B/C, fp32 A/D/dt_bias; "
         f"median of {args.reps} calls, L2 flushed; mamba_ssm: "
         + ("mamba_chunk_scan_combined" if mamba else "NOT INSTALLED") + "; ours first, then mamba_ssm (its row "
         "holds the rel. L2 difference of our y from its y)", "",
         "| kernel | B x T | forward ms | forward+backward ms | rel. L2 diff of y, ours vs mamba_ssm |",
         "|---|---|---:|---:|---:|")
    results = []
    for Bt, T in ((8, 2048), (2, 8192)):
        inputs = make_inputs(Bt, T, H, P, N, torch.bfloat16, "cuda", seed=Bt * T)
        kernels = {"undertow triton": lambda v: IMPLEMENTATIONS["triton"](
            v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], dt_bias=v["dt_bias"], chunk_size=chunk)}
        if mamba is not None:
            kernels["mamba_ssm"] = lambda v: mamba(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk, D=v["D"],
                                                  dt_bias=v["dt_bias"], dt_softplus=True)
        dy = torch.randn(Bt, T, H, P, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(torch.bfloat16)
        measured = {}
        for name, fn in kernels.items():  # a failing kernel is reported and the run goes on; rows print as measured
            try:
                measured[name] = measure(fn, inputs, dy, args.reps)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                emit(rows, f"| {name} | {Bt} x {T} | FAILED: {type(error).__name__}: {str(error)[:120]} | | |")
                continue
            y, fwd, fwd_bwd = measured[name]
            diff = ""
            if name == "mamba_ssm" and "undertow triton" in measured:
                ours = measured["undertow triton"][0]
                diff = f"{((ours - y).norm() / y.norm()).item():.2e}"
            results.append({"kernel": name, "B": Bt, "T": T, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "rel_diff_y": diff})
            emit(rows, f"| {name} | {Bt} x {T} | {fwd:.3f} | {fwd_bwd:.3f} | {diff} |")
        del inputs, measured
        torch.cuda.empty_cache()
    by_kernel = {(r["kernel"], r["B"], r["T"]): r for r in results}
    for (name, Bt, T), ours in by_kernel.items():
        theirs = by_kernel.get(("mamba_ssm", Bt, T))
        if name == "undertow triton" and theirs:
            emit(rows, f"\nB={Bt}, T={T}: undertow / mamba_ssm = {ours['fwd_ms'] / theirs['fwd_ms']:.2f} forward, "
                       f"{ours['fwd_bwd_ms'] / theirs['fwd_bwd_ms']:.2f} forward+backward (target <= 0.6)")
    if args.out:
        Path(args.out, "bench_ssd.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return rows


def run_profile(args, device: str = "cuda", shape=(8, 2048, 32, 64, 128, 256)) -> list[str]:
    """Where our forward+backward spends its time: torch.profiler over --reps calls (after 3 warm
    ones), each kernel's device time per call, beside the wall time per call (CUDA events, no L2 flush)
    and the host time to issue one call. Wall >> the kernels' sum means the call is launch-bound."""
    from torch.profiler import ProfilerActivity, profile

    Bt, T, H, P, N, chunk = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    inputs = make_inputs(Bt, T, H, P, N, dtype, device, seed=7)
    dy = torch.randn(Bt, T, H, P, device=device).to(dtype)
    leaves = leaves_of(inputs)

    def call():
        y = IMPLEMENTATIONS["triton"](leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                                      dt_bias=leaves["dt_bias"], chunk_size=chunk)
        y.backward(dy)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        call()
    sync()
    host = []
    for _ in range(args.reps):
        start = time.perf_counter()
        call()
        host.append(time.perf_counter() - start)
        sync()
    wall = cuda_ms(call, leaves, args.reps) if device == "cuda" else float("nan")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.reps):
            call()
        sync()
    rows = []
    emit(rows, header(args), "", f"profile of undertow triton SSD forward+backward: B={Bt}, T={T}, {H} heads x {P}, "
         f"d_state {N}, chunk {chunk}, {str(dtype).removeprefix('torch.')}; per call, mean of {args.reps}", "",
         f"host time to issue one call: {statistics.median(host) * 1e3:.3f} ms; wall per call (CUDA events, L2 "
         f"flushed): {wall:.3f} ms", "", "| kernel / op | calls per call | device ms per call | host ms per call |",
         "|---|---:|---:|---:|")
    events = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0.0)
        events.append((device_us, evt.key, evt.count, evt.self_cpu_time_total))
    events.sort(key=lambda e: (-e[0], -e[3]))
    total = sum(e[0] for e in events)
    for device_us, key, count, cpu_us in events[:25]:
        emit(rows, f"| {key[:90]} | {count / args.reps:.1f} | {device_us / 1e3 / args.reps:.3f} | "
                   f"{cpu_us / 1e3 / args.reps:.3f} |")
    emit(rows, f"\nsum of device time per call: {total / 1e3 / args.reps:.3f} ms")
    if args.out:
        Path(args.out, "bench_ssd_profile.md").write_text("\n".join(rows) + "\n")
    return rows


SWEEP = [  # (name, environment): the knobs of undertow/kernels/ssd/triton.py
    ("tf32 (default)", {}),
    ("fused bwd", {"UNDERTOW_SSD_BWD": "fused"}),
    ("fused bwd m=32", {"UNDERTOW_SSD_BWD": "fused", "UNDERTOW_SSD_TILES": "m=32"}),
    ("forward heads=8", {"UNDERTOW_SSD_DOT": "forward", "UNDERTOW_SSD_TILES": "heads=8"}),
    ("tf32 warps=8", {"UNDERTOW_SSD_TILES": "warps=8"}),
    ("forward", {"UNDERTOW_SSD_DOT": "forward"}),
    ("forward warps=8", {"UNDERTOW_SSD_DOT": "forward", "UNDERTOW_SSD_TILES": "warps=8"}),
    ("input", {"UNDERTOW_SSD_DOT": "input"}),
    ("input warps=8", {"UNDERTOW_SSD_DOT": "input", "UNDERTOW_SSD_TILES": "warps=8"}),
    ("input m=128 warps=8", {"UNDERTOW_SSD_DOT": "input", "UNDERTOW_SSD_TILES": "m=128,warps=8"}),
    ("tf32 heads=8", {"UNDERTOW_SSD_TILES": "heads=8"}),
    ("tf32 m=32", {"UNDERTOW_SSD_TILES": "m=32"}),
    ("tf32 heads=32", {"UNDERTOW_SSD_TILES": "heads=32"}),
    ("tf32 bwd warps=8", {"UNDERTOW_SSD_TILES": "bwarps=8"}),
]
GRADS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def outputs_and_grads(fn, inputs: dict, dy: torch.Tensor) -> dict:
    leaves = leaves_of(inputs)
    y = fn(leaves)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach().float(), **{k: leaves[k].grad.float() for k in GRADS}}


def run_sweep(args) -> list[str]:
    """Our kernel under each SWEEP setting at B=8, T=2048: speed and error against exact float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    H, P, N, chunk, Bt, T = 32, 64, 128, 256, 8, 2048
    inputs = make_inputs(Bt, T, H, P, N, torch.bfloat16, "cuda", seed=5, doc_every=700)
    dy = torch.randn(Bt, T, H, P, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).to(torch.bfloat16)

    def fn(v):
        return IMPLEMENTATIONS["triton"](v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], dt_bias=v["dt_bias"],
                                         chunk_size=chunk, doc_ids=v.get("doc_ids"))

    setting = (f"sweep of undertow triton SSD settings: B={Bt}, T={T}, {H} heads x {P}, d_state {N}, chunk {chunk}, "
               f"bf16, documents every 700 tokens; median of {args.reps} calls, L2 flushed; errors are "
               "||out - exact|| / ||exact|| against float32 inputs run exactly by the chunked PyTorch form (bf16 tolerance 1e-2)")
    rows = [header(args), "", setting, "",
            "| setting | forward ms | forward+backward ms | err y | worst grad err (which) |", "|---|---:|---:|---:|---|"]
    print("\n".join(rows), flush=True)  # row by row below: a time limit still leaves the rows done

    def chunked(v):  # the exact reference: float32 einsums with tf32 off (set above), tested to 1e-5
        return IMPLEMENTATIONS["chunked"](v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], dt_bias=v["dt_bias"],
                                          chunk_size=chunk, doc_ids=v.get("doc_ids"))

    exact_inputs = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    exact = outputs_and_grads(chunked, exact_inputs, dy.float())
    torch.cuda.empty_cache()
    results = []
    saved = {k: os.environ.get(k) for k in ("UNDERTOW_SSD_DOT", "UNDERTOW_SSD_TILES", "UNDERTOW_SSD_BWD")}
    for name, env in [item for item in SWEEP if not args.only or item[0] in args.only]:
        for k in saved:
            os.environ.pop(k, None)
        os.environ.update(env)
        try:
            got = outputs_and_grads(fn, inputs, dy)
            errors = {k: ((got[k] - exact[k]).norm() / exact[k].norm()).item() for k in got}
            worst = max(GRADS, key=lambda k: errors[k])
            _, fwd, fwd_bwd = measure(fn, inputs, dy, args.reps)
        except Exception as error:  # noqa: BLE001 (a setting that does not compile, e.g. out of shared memory)
            rows.append(f"| {name} | FAILED: {type(error).__name__}: {str(error)[:100]} | | | |")
            print(rows[-1], flush=True)
            continue
        results.append({"setting": name, "env": env, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "errors": errors})
        rows.append(f"| {name} | {fwd:.3f} | {fwd_bwd:.3f} | {errors['y']:.1e} | {errors[worst]:.1e} ({worst}) |")
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v
    if args.out:
        Path(args.out, "bench_ssd_sweep.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cpu", "gpu"])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="gpu: time the settings in SWEEP instead")
    parser.add_argument("--profile", action="store_true", help="gpu: per-kernel device time of our forward+backward")
    parser.add_argument("--only", type=lambda text: [item.strip() for item in text.split(";") if item.strip()],
                        default=None, help='--sweep: only these SWEEP settings, ";"-separated names')
    parser.add_argument("--out", default=None, help="gpu: also write bench_ssd_gpu.md and bench_ssd.json here")
    args = parser.parse_args()
    unknown = sorted(set(args.only or ()) - {name for name, _ in SWEEP})
    if unknown:
        sys.exit(f"--only: unknown settings {unknown}; SWEEP has {[name for name, _ in SWEEP]}")
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("bench_ssd.py gpu: no CUDA device")
    if args.mode == "gpu" and args.profile:
        run_profile(args)
        return
    rows = run_cpu(args) if args.mode == "cpu" else run_sweep(args) if args.sweep else run_gpu(args)
    text = "\n".join(rows)  # every row was printed as it came
    if args.out:
        name = "sweep" if args.sweep else args.mode
        Path(args.out, f"bench_ssd_{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
