"""parallel.mesh.end_process: a process that used gloo collectives ends with the exit code it was
given, not SIGABRT. The race it closes (a gloo worker thread taking the GIL to free a Python-made
tensor while the interpreter shuts down) is set up here as tightly as it happens: collectives on
Python tensors, some never waited on, as the process's last work."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from undertow.parallel.mesh import end_process


def _collectives_then_end(rank, port, code):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pending = [dist.all_reduce(torch.ones(64), async_op=True) for _ in range(4)]
    dist.all_reduce(torch.ones(1000))
    del pending
    end_process(code)
    raise AssertionError("end_process returned under gloo")  # exits 1 through spawn's wrapper


def _exit_codes(code: int) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_collectives_then_end, args=(port, code), nprocs=2, join=False, start_method="spawn")
    for process in ctx.processes:
        process.join(timeout=120)
    return [process.exitcode for process in ctx.processes]


def test_gloo_ranks_end_with_the_given_code_after_collectives():
    for _ in range(3):  # the plain exit died of SIGABRT (-6) in about 1 of 3 spawns
        assert _exit_codes(0) == [0, 0]
    assert _exit_codes(5) == [5, 5]  # a failure: no barrier, the code kept


def test_without_a_process_group_the_code_is_returned():
    assert not dist.is_initialized()
    assert end_process(7) == 7
