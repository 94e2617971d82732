"""Training throughput (tokens/s) of a recipe on this machine, excluding start-up and warm-up.

    python scripts/bench_train.py [RECIPE] [--steps 60] [--warmup 10] [--section.field VALUE ...]

Runs the recipe (default: tiny) in a temporary run directory with checkpoints, validation and
TensorBoard off, and reports the median tokens/s over the steps after `--warmup`, with
FLOPs/token and the achieved FLOP/s. Prints one markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import tempfile
import time

import torch

from undertow.cli import split_overrides
from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="tiny")
    parser.add_argument("--steps", type=int, default=60, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    plain, overrides = split_overrides(__import__("sys").argv[1:])
    args = parser.parse_args(plain)
    logging.getLogger("undertow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as run_dir:
        total = args.warmup + args.steps
        cfg = load_config(args.recipe, overrides + [
            "--training.run_dir", run_dir, "--training.steps", str(total), "--schedule.warmup_steps", "0",
            "--training.val_every", "0", "--checkpoint.every", "0", "--logging.tensorboard", "false",
        ])
        trainer = Trainer(cfg)
        data = iter(trainer.train_loader)
        times = []
        for step in range(total):
            micro = [next(data) for _ in range(cfg.training.grad_accum_steps)]
            start = time.perf_counter()
            trainer.train_step(micro)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        tokens = cfg.training.micro_batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len
        tps = tokens / statistics.median(times)
        fpt = trainer.spec.flops_per_token(cfg.model, cfg.data.seq_len)
    print("| recipe | params | tokens/step | tokens/s | GFLOP/s | machine | torch | date |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    print(
        f"| {args.recipe} {' '.join(overrides)} | {trainer.n_params / 1e6:.2f}M | {tokens} | {tps:,.0f} | "
        f"{tps * fpt / 1e9:.1f} | {platform.machine()}, {torch.get_num_threads()} threads, {trainer.device} | "
        f"{torch.__version__} | {datetime.date.today()} |"
    )


if __name__ == "__main__":
    main()
