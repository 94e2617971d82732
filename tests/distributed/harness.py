"""Run a function in N spawned CPU processes joined by a gloo process group, and collect results.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

Each process sets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), uses
one intra-op thread (the machine has few cores), initializes gloo, runs fn and destroys the
group. An exception in any rank fails the call with that rank's traceback. fn must be defined at
module level (it is pickled by reference).

A rank ends as `undertow` does (parallel.mesh.end_process: a barrier, the groups destroyed,
os._exit): a plain interpreter exit raced gloo's worker threads and died of SIGABRT after fn had
returned ("terminate called without an active exception", tests/distributed/test_comm_count.py's
spawn in 1 of 3 runs; the cause is in end_process's docstring). A rank killed by a signal anyway
gets its Python stacks dumped (faulthandler) and the spawn is run once more with a warning, where the
caller says fn can run twice (`retry_crash`: no run directory of the first attempt is read by the
second). Each rank's stderr (C++ messages and faulthandler's stacks
included) goes to a file; the tail of the dead rank's is in the warning, and every failure's message
carries the ranks' tails.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from undertow.parallel.mesh import end_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    stderr = open(os.path.join(result_dir, f"{rank}.stderr"), "w")  # noqa: SIM115 - the process's lifetime
    os.dup2(stderr.fileno(), 2)  # C++ messages too ("terminate called ..."): read back on a failure
    faulthandler.enable(file=stderr, all_threads=True)  # a C++ abort shows where Python was
    torch.set_num_threads(1)
    out = os.path.join(result_dir, f"{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": result}, out)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"error": traceback.format_exc()}, out)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    end_process(0)  # as `undertow` ends: barrier, groups destroyed, os._exit (no abort at interpreter exit)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, retry_crash: bool = True) -> list:
    """Per-rank return values of fn(rank, world_size, *args), in rank order."""
    try:
        return _spawn(fn, world_size, args, timeout)
    except _Crashed as crash:
        if not retry_crash:
            raise AssertionError(f"distributed run failed: {crash}") from crash.__cause__
        warnings.warn(f"{fn.__name__} in {world_size} processes: {crash}; running it once more", RuntimeWarning,
                      stacklevel=2)
        try:
            return _spawn(fn, world_size, args, timeout)
        except _Crashed as again:
            raise AssertionError(f"distributed run failed twice: {again}") from again.__cause__


class _Crashed(Exception):
    """A rank died of a signal (no Python exception to report)."""


def _stderr_tails(result_dir: str, world_size: int, ranks=None, chars: int = 3000) -> str:
    """The last `chars` of each rank's stderr file (all ranks by default), for a failure's message."""
    parts = []
    for rank in range(world_size) if ranks is None else ranks:
        try:
            with open(os.path.join(result_dir, f"{rank}.stderr"), errors="replace") as f:
                text = f.read()[-chars:].strip()
        except OSError:
            continue
        if text:
            parts.append(f"\n--- rank {rank} stderr (tail):\n{text}")
    return "".join(parts)


def _spawn(fn, world_size: int, args: tuple, timeout: float) -> list:
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, result_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except mp.ProcessExitedException as error:
            if error.signal_name:
                raise _Crashed(f"{error}{_stderr_tails(result_dir, world_size, [error.error_index])}") from error
            raise AssertionError(f"distributed run failed: {error}{_stderr_tails(result_dir, world_size)}") from error
        except Exception as error:
            details = []
            for rank in range(world_size):
                path = os.path.join(result_dir, f"{rank}.pt")
                if os.path.exists(path):
                    saved = torch.load(path, weights_only=False)
                    if "error" in saved:
                        details.append(f"--- rank {rank}:\n{saved['error']}")
            raise AssertionError("distributed run failed\n" + "\n".join(details)
                                 + _stderr_tails(result_dir, world_size)) from error
        return [torch.load(os.path.join(result_dir, f"{r}.pt"), weights_only=False)["ok"] for r in range(world_size)]
