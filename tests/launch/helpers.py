"""Shared pieces of the launcher tests: a small training config, its uninterrupted reference losses,
and subprocess helpers. Every training process runs with one intra-op thread (the machine has few
cores, and the runs compared must use the same thread count to match bit for bit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from undertow.pretrain.config import load_config

from tests.launch.slurm_cluster import descendants

# A 2-layer model on the embedded corpus: a step takes tens of milliseconds, so a run of STEPS
# steps leaves a wide window to interrupt it after its first checkpoint.
STEPS = 60
EVERY = 10
TINY_ARGS = [
    "--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "1",
    "--model.multiple_of", "16", "--data.seq_len", "32", "--data.embedded_vocab_size", "512",
    "--training.micro_batch_size", "4", "--training.val_every", "0", "--schedule.warmup_steps", "2",
    "--logging.every", "10", "--logging.tensorboard", "false",
    "--training.steps", str(STEPS), "--checkpoint.every", str(EVERY),
]

DP2_ARGS = ["--parallel.dp_shard", "2"]  # two processes, FSDP over both


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def undertow(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`undertow ARGS` in a subprocess with the test environment; output captured as text."""
    kwargs.setdefault("env", env())
    return subprocess.run([sys.executable, "-m", "undertow.cli", *args], capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 300), **kwargs)


def read_losses(run_dir) -> dict[int, float]:
    """step -> loss of metrics.jsonl's train records (a resumed run re-records steps; the last wins).
    A last line without its newline is a record being written while this reads (seen in CI: a line cut
    after 52 characters): skipped, the next poll reads it whole."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    losses = {}
    with open(path) as f:
        for line in f:
            if line.strip() and line.endswith("\n"):
                rec = json.loads(line)
                if rec["kind"] == "train":
                    losses[rec["step"]] = rec["loss"]
    return losses


def wait_for_step(run_dir, step: int, alive=lambda: True, timeout: float = 240.0) -> int:
    """Poll metrics.jsonl until it records `step`; returns the newest step seen. Fails if `alive()` turns
    false first (the run ended before it could be interrupted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = max(read_losses(run_dir), default=0)
        if seen >= step:
            return seen
        assert alive(), f"the run ended at step {seen}, before step {step}"
        time.sleep(0.02)
    raise TimeoutError(f"{run_dir} did not reach step {step} in {timeout}s")


def tiny_config(run_dir, extra: list[str] = ()):
    return load_config("tiny", [*TINY_ARGS, "--training.run_dir", str(run_dir), *extra])


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes under a torchrun."""
    ranks = {}
    for pid in descendants(torchrun_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"undertow.cli" in cmdline and b"RANK" in environ:
            ranks[int(environ[b"RANK"])] = pid
    return ranks
