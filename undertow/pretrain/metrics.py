"""Training metrics: console lines, TensorBoard scalars, metrics.jsonl, throughput and MFU."""

from __future__ import annotations

import json
import math
import os
import resource
import time

import torch

from undertow.log import get_logger

log = get_logger("undertow.metrics")

# Dense bf16 peak TFLOP/s (no sparsity) of common accelerators, matched by substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0, "V100": 125.0}


def detect_peak_tflops(device: torch.device) -> float:
    """Peak dense TFLOP/s of one device if it is a known GPU, else 0 (MFU not shown)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return 0.0


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of the run so far: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Throughput:
    """Tokens/s and MFU over the window since the last `read()`. MFU counts the FLOPs each step spent:
    `add(tokens, flops_per_token)` for a step whose cost differs from the nominal one (a depth drawn
    per step), the nominal `flops_per_token` otherwise."""

    def __init__(self, flops_per_token: float, peak_tflops: float):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12
        self.tokens, self.flops = 0, 0.0
        self.start = time.perf_counter()

    def add(self, tokens: int, flops_per_token: float | None = None) -> None:
        self.tokens += tokens
        self.flops += tokens * (self.flops_per_token if flops_per_token is None else flops_per_token)

    def read(self) -> tuple[float, float | None]:
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        tps, flops = self.tokens / seconds, self.flops / seconds
        self.tokens, self.flops, self.start = 0, 0.0, now
        mfu = flops / self.peak_flops if self.peak_flops > 0 else None
        return tps, mfu


class StepClock:
    """Elapsed time and ETA of a run's steps, for the console line: "step 50/300 (17%), 1:10 elapsed,
    ETA 5:50". The rate counts only the steps this process ran (a resumed run's own)."""

    def __init__(self, first_step: int, total: int):
        self.first, self.total, self.start = first_step, total, time.perf_counter()

    def describe(self, step: int) -> str:
        elapsed = time.perf_counter() - self.start
        done = step - self.first
        eta = _clock(elapsed / done * (self.total - step)) if done > 0 else "?"
        return f"{step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), {_clock(elapsed)} elapsed, ETA {eta}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _cut_after(path: str, step: int) -> None:
    """Keep the records of metrics.jsonl up to `step` (atomically: a temporary file renamed over it).
    A torn last line (a crash mid-write) goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsWriter:
    """Writes every step's scalars to RUN_DIR/metrics.jsonl, and TensorBoard/console every N steps.

    metrics.jsonl keeps full float precision (JSON floats round-trip exactly), so two runs
    can be compared bit for bit, and is strict JSON: a NaN or infinite value is written as null
    (the record's `skipped` says why). With enabled=False (every rank but the first) it writes nothing.
    """

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool = True, start_step: int = 0):
        """start_step: the step a resumed run continues from: records of later steps, which the run
        will write again, are cut from metrics.jsonl and purged from TensorBoard, so each step
        appears once. A run from step 0 appends, as before."""
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if start_step:
            _cut_after(path, start_step)
        self.jsonl = open(path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events at or after it that an earlier writer left
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def record(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _strict(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()

    def publish(self, step: int, scalars: dict[str, float | None], prefix: str, progress: str | None = None) -> None:
        """TensorBoard scalars under `prefix/` and one console line (`progress` in place of the bare step)."""
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
            self.tb.flush()
        log.info("%s step %s | %s", prefix, progress or step, " | ".join(_fmt(k, v) for k, v in scalars.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _strict(value):
    """JSON has no NaN or infinity: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return f"{key} n/a"
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "tokens_per_s":
        return f"tok/s {value:,.0f}"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key == "peak_mem_gib":
        return f"mem {value:.2f}GiB"
    if isinstance(value, float):
        return f"{key} {value:.3g}" if 0 < abs(value) < 1e-3 else f"{key} {value:.4f}"
    return f"{key} {value}"
