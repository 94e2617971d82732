"""Context parallelism on CPU: per-rank activation memory, time and communication of one Mamba-2
training step (forward + backward) on one long packed row, at several cp degrees.

    python scripts/bench_cp.py [--seq-len 16384] [--ranks 1 2 4] [--steps 3] [--d-model 128]

Each cp degree runs in its own gloo process group (one intra-op thread per rank). Per rank it
reports: the bytes autograd saves for backward (activations, distinct storages, parameters
excluded), the peak resident memory, wall and CPU seconds per step, and the bytes this rank
receives in CP's collectives per step (context_comm.COUNTER; the gradient all-reduce, which FSDP
or DDP does anyway, is not counted). The summed loss of the row is printed for each degree: it
must agree across degrees. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from undertow.log import get_logger
from undertow.models.common.loss import lm_loss_sum
from undertow.models.mamba.config import MambaConfig
from undertow.models.registry import build_model
from undertow.parallel.context import (
    all_reduce_gradients,
    apply_context_parallel,
    reduce_loss,
    shard_batch,
)
from undertow.parallel.context_comm import COUNTER

MIB = 2**20


def long_row(seq_len: int, vocab: int) -> dict:
    """One packed row of `seq_len` tokens: documents of 1.5K-7K tokens, boundaries anywhere."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    position_ids = torch.empty(1, seq_len, dtype=torch.long)
    doc_ids = torch.empty(1, seq_len, dtype=torch.int32)
    start, doc = 0, 0
    while start < seq_len:
        end = min(seq_len, start + int(torch.randint(1536, 7168, (1,), generator=gen)))
        position_ids[0, start:end] = torch.arange(end - start)
        doc_ids[0, start:end] = doc
        labels[0, end - 1] = -100 if end < seq_len else labels[0, end - 1]
        start, doc = end, doc + 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


class SavedActivations:
    """Bytes of the distinct non-parameter storages autograd saves for backward."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    get_logger().setLevel(logging.WARNING)  # after the package logger configured itself
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = MambaConfig(vocab_size=args.vocab, d_model=args.d_model, layer_pattern="M" * args.layers, d_state=32,
                          expand=2, headdim=32, chunk_size=args.chunk_size)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.init_weights()
        batch = long_row(args.seq_len, args.vocab)
        group = dist.group.WORLD
        if world > 1:
            apply_context_parallel(model, group)
        local = shard_batch(batch, rank, world)
        walls, cpus, comm, saved, losses = [], [], [], [], []
        rss_before = rss_bytes()
        for step in range(args.warmup + args.steps):
            model.zero_grad(set_to_none=True)
            COUNTER.reset()
            meter = SavedActivations(model)
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                logits = model(local["input_ids"], position_ids=local["position_ids"], doc_ids=local["doc_ids"])
                loss = lm_loss_sum(logits, local["labels"])
            loss.backward()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            cp_bytes = COUNTER.total_bytes
            if world > 1:
                all_reduce_gradients(model, group)
                loss = reduce_loss(loss, group)
            if step >= args.warmup:
                walls.append(wall)
                cpus.append(cpu)
                comm.append(cp_bytes)
                saved.append(meter.nbytes)
                losses.append(loss.item())
            del logits, loss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        result = {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "comm": max(comm),
                  "saved": max(saved), "peak_rss": peak, "rss_before": rss_before, "loss": losses[-1],
                  "calls": dict(COUNTER.calls)}
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_degree(world: int, args) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(world, port, args, out_dir), nprocs=world, start_method="spawn")
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.json")) as f:
                results.append(json.load(f))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    rows = []
    for world in args.ranks:
        res = run_degree(world, args)
        rows.append((world, res))
        print(f"cp={world}: loss {res[0]['loss']:.6f}, per-rank saved activations "
              f"{[round(r['saved'] / MIB) for r in res]} MiB", flush=True)
    print(f"\nMamba-2 d_model={args.d_model}, {args.layers} layers (M), one row of {args.seq_len} tokens, "
          f"{platform.machine()} CPU ({os.cpu_count()} cores), 1 thread per rank, torch {torch.__version__}, "
          f"{datetime.date.today()}\n")
    print("| cp | tokens/rank | activations saved / rank (MiB) | peak RSS / rank (MiB) | step wall (s) | "
          "step CPU / rank (s) | CP comm / rank / step (MiB) | CP collectives / step | summed loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for world, res in rows:
        worst = {key: max(r[key] for r in res) for key in ("saved", "peak_rss", "wall", "cpu", "comm")}
        calls = ", ".join(f"{n} x{c}" for n, c in sorted(res[-1]["calls"].items())) or "none"
        print(f"| {world} | {args.seq_len // world} | {worst['saved'] / MIB:,.0f} | {worst['peak_rss'] / MIB:,.0f} | "
              f"{worst['wall']:.2f} | {worst['cpu']:.2f} | {worst['comm'] / MIB:.2f} | {calls} | "
              f"{res[0]['loss']:.4f} |")


if __name__ == "__main__":
    main()
