"""Per-layout cost of a training step on CPU: time, collective payload bytes and memory per rank.

    python scripts/bench_layouts.py [--seq-len 256] [--batch 2] [--steps 3] [--layouts single,fsdp2,...]

Runs the Trainer on a small Mamba-2/Mamba-1/attention/MLP hybrid (pattern mM*-, d_model 64,
ngroups 2) in N spawned gloo processes per layout, times --steps steps after one warm-up step, and
counts every collective of one step with undertow.parallel.comm_count (payload bytes each rank puts
in, by collective). Prints a markdown table for docs/benchmarks.md. Wall times on a 2-core machine
with 4 processes measure contention, not scaling: read the bytes and memory columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = {
    "single": [],
    "fsdp2": ["--parallel.dp_shard", "2"],
    "cp2": ["--parallel.cp", "2"],
    "tp2": ["--parallel.tp", "2"],
    "hsdp2x2": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"],
    "fsdp2xtp2": ["--parallel.dp_shard", "2", "--parallel.tp", "2"],
    "fsdp2xcp2": ["--parallel.dp_shard", "2", "--parallel.cp", "2"],
    "cp2xtp2": ["--parallel.cp", "2", "--parallel.tp", "2"],
    "pp2": ["--parallel.pp", "2", "--parallel.pp_microbatches", "2"],
    "fsdp2xpp2": ["--parallel.dp_shard", "2", "--parallel.pp", "2", "--parallel.pp_microbatches", "2"],
    "tp2xpp2": ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.pp_microbatches", "2"],
}
DIMS = ("--parallel.pp", "--parallel.dp_replicate", "--parallel.dp_shard", "--parallel.cp", "--parallel.tp")


def world_of(layout: list[str]) -> int:
    world = 1
    for name, value in zip(layout[::2], layout[1::2]):
        world *= int(value) if name in DIMS else 1
    return world


def worker(rank, world, port, layout, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    torch.set_num_threads(1)
    logging.getLogger("undertow").setLevel(logging.WARNING)
    from undertow.parallel.comm_count import count_collectives
    from undertow.pretrain.config import load_config
    from undertow.pretrain.trainer import Trainer

    cfg = load_config("tiny-hybrid", [
        "--model.d_model", "64", "--model.layer_pattern", "mM*-", "--model.ngroups", "2", "--model.headdim", "16",
        "--model.d_state", "16", "--model.chunk_size", "32", "--data.seq_len", str(args.seq_len),
        "--training.micro_batch_size", str(args.batch), "--training.run_dir", os.path.join(out_dir, "run"),
        "--training.val_every", "0", "--checkpoint.every", "0", "--logging.tensorboard", "false",
        "--data.num_workers", "0", "--schedule.warmup_steps", "0", *layout,
    ])
    trainer = Trainer(cfg)
    data = iter(trainer.train_loader)

    def step():
        trainer.train_step([next(data)])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    with count_collectives() as counts:
        step()
    times = []
    for _ in range(args.steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"rank": rank, "step_s": statistics.median(times), "bytes": dict(counts.bytes), "calls": dict(counts.calls),
              "total_bytes": counts.total_bytes, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "params": trainer.n_params, "tokens_per_step": args.batch * args.seq_len * trainer.dims.dp}
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_layout(name: str, args) -> list[dict]:
    layout = LAYOUTS[name]
    world = world_of(layout)
    with tempfile.TemporaryDirectory() as out_dir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(worker, args=(world, port, layout, args, out_dir), nprocs=world, start_method="spawn")
        return [json.load(open(os.path.join(out_dir, f"{r}.json"))) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="rows per data-parallel rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    rows = [f"`python scripts/bench_layouts.py {' '.join(sys.argv[1:])}` — {platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}", "",
            "| layout | processes | tokens/step | s/step (median) | collective payload per rank per step | "
            "by collective | max RSS per rank |", "|---|---:|---:|---:|---:|---|---:|"]
    print("\n".join(rows), flush=True)
    for name in args.layouts.split(","):
        results = run_layout(name, args)
        worst = max(results, key=lambda r: r["total_bytes"])
        kinds = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(worst["bytes"].items()) if v) or "none"
        line = (f"| {name} | {len(results)} | {worst['tokens_per_step']} | "
                f"{statistics.median(r['step_s'] for r in results):.3f} | {worst['total_bytes'] / 2**20:.2f} MiB | "
                f"{kinds} | {max(r['max_rss_mib'] for r in results):.0f} MiB |")
        print(line, flush=True)


if __name__ == "__main__":
    main()
