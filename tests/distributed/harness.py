"""Run a function in N spawned CPU processes joined by a gloo process group, and collect results.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

Each process sets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), uses
one intra-op thread (the machine has few cores), initializes gloo, runs fn and destroys the
group. An exception in any rank fails the call with that rank's traceback. fn must be defined at
module level (it is pickled by reference).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    out = os.path.join(result_dir, f"{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": result}, out)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Per-rank return values of fn(rank, world_size, *args), in rank order."""
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, result_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as error:
            details = []
            for rank in range(world_size):
                path = os.path.join(result_dir, f"{rank}.pt")
                if os.path.exists(path):
                    saved = torch.load(path, weights_only=False)
                    if "error" in saved:
                        details.append(f"--- rank {rank}:\n{saved['error']}")
            raise AssertionError("distributed run failed\n" + "\n".join(details)) from error
        return [torch.load(os.path.join(result_dir, f"{r}.pt"), weights_only=False)["ok"] for r in range(world_size)]
